import dataclasses
import gc
import math

import numpy as np
import pytest
import torch

from cupola.collections.world.data.camera import plucker_embedding, relative_to_first, scale_intrinsics
from cupola.collections.world.data.environments import (
    CameraScene,
    CameraSceneConfig,
    EnvironmentDataModule,
    PushEnvConfig,
    Sphere,
    camera_episodes,
    camera_path,
    look_at,
    push_episodes,
    render_camera_scene,
    rollout,
    simulate,
)
from cupola.toolkit.config import ConfigError

PUSH = PushEnvConfig(size=32, frames=17)
CAMERA = CameraSceneConfig(size=32, frames=9)


@pytest.fixture(scope="module")
def pushes():
    return push_episodes(24, PUSH, seed=5)


def mean_abs_diff(a, b):
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# ------------------------------------------------------------------------------------------ push


def test_push_episodes_are_a_function_of_the_seed(pushes):
    again = push_episodes(3, PUSH, seed=5)
    other = push_episodes(3, PUSH, seed=6)
    for a, b, c in zip(pushes, again, other):
        assert np.array_equal(a.video, b.video) and np.array_equal(a.actions, b.actions)
        assert a.scene == b.scene and a.prompt == b.prompt
        assert not np.array_equal(a.video, c.video)
    assert pushes[0].video.shape == (17, 32, 32, 3) and pushes[0].video.dtype == np.uint8
    assert pushes[0].actions.shape == (16, 2) and pushes[0].actions.dtype == np.float32
    assert pushes[0].states.shape == (17, 4) and pushes[0].states.dtype == np.float32


def test_rollout_reproduces_an_episode_from_its_actions(pushes):
    for episode in pushes[:6]:
        assert np.array_equal(rollout(PUSH, episode.scene, episode.actions), episode.video)
        assert np.array_equal(simulate(PUSH, episode.scene, episode.actions), episode.states)


def test_actions_decide_the_future_not_the_first_frame(pushes):
    episode = pushes[0]
    assert np.all(episode.states[0, 2:] == 0)  # at rest: frame 0 does not show where it will go
    pushed_right = rollout(PUSH, episode.scene, np.tile([1.0, 0.0], (16, 1)))
    pushed_left = rollout(PUSH, episode.scene, np.tile([-1.0, 0.0], (16, 1)))
    assert np.array_equal(pushed_right[0], pushed_left[0]) and np.array_equal(
        pushed_right[0], episode.video[0]
    )
    for t in (4, 8, 16):
        assert mean_abs_diff(pushed_right[t], pushed_left[t]) > 1.0


def test_push_dynamics_are_the_documented_ones():
    scene = dataclasses.replace(push_episodes(1, PUSH, seed=0)[0].scene, start=(0.5, 0.5, 0.0, 0.0))
    cfg = PUSH
    rest = simulate(cfg, scene, np.zeros((5, 2)))
    assert np.all(rest == rest[0])
    states = simulate(cfg, scene, [[1.0, 0.0], [0.0, 0.0]])
    v1 = cfg.action_scale
    np.testing.assert_allclose(states[1], [0.5 + v1, 0.5, v1, 0.0], rtol=1e-6)
    v2 = (1 - cfg.friction) * v1
    np.testing.assert_allclose(states[2], [0.5 + v1 + v2, 0.5, v2, 0.0], rtol=1e-6)
    # a push longer than 1 is the unit push; speed never exceeds max_speed
    np.testing.assert_allclose(simulate(cfg, scene, [[3.0, 0.0]]), states[:2], rtol=1e-6)
    fast = simulate(cfg, scene, np.tile([0.6, 0.8], (60, 1)))
    assert np.all(np.hypot(fast[:, 2], fast[:, 3]) <= cfg.max_speed * (1 + 1e-5))


def test_object_stays_inside_the_frame_and_bounces():
    episode = push_episodes(1, PUSH, seed=1)[0]
    r = episode.scene.radius
    states = simulate(PUSH, episode.scene, np.tile([1.0, 0.3], (200, 1)))
    assert np.all(states[:, :2] >= r - 1e-6) and np.all(states[:, :2] <= 1 - r + 1e-6)
    assert (states[:, 2] < 0).any()  # bounced back off the right wall although pushed right
    for e in push_episodes(8, PUSH, seed=2):
        assert np.all(e.states[:, :2] >= e.scene.radius - 1e-6)
        assert np.all(e.states[:, :2] <= 1 - e.scene.radius + 1e-6)


def test_frames_show_the_object_where_the_state_says(pushes):
    for e in pushes[:8]:
        for t in (0, 8, 16):
            x, y = (e.states[t, :2] * PUSH.size).astype(int)
            assert np.abs(e.video[t, y, x].astype(int) - e.scene.colour).max() <= 3


def test_copying_the_first_frame_is_a_poor_prediction(pushes):
    moved = [np.hypot(*(e.states[-1, :2] - e.states[0, :2])) for e in pushes]
    assert np.median(moved) > 0.1  # frame sides
    assert np.mean([mean_abs_diff(e.video[0], e.video[-1]) for e in pushes]) > 3.0
    # sub-pixel motion shows: anti-aliased edges change after the first push
    assert np.mean([mean_abs_diff(e.video[1], e.video[2]) > 0 for e in pushes]) > 0.7


# ---------------------------------------------------------------------------------------- camera


def random_pose(rng):
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    pose = np.eye(4)
    pose[:3, :3] = q * np.sign(np.linalg.det(q))
    pose[:3, 3] = rng.uniform(-3, 3, size=3)
    return torch.tensor(pose, dtype=torch.float64)


K_TEST = torch.tensor([[30.0, 0.0, 10.5], [0.0, 28.0, 7.5], [0.0, 0.0, 1.0]], dtype=torch.float64)


def test_plucker_rays_point_along_the_camera_axes():
    poses = torch.stack([random_pose(np.random.default_rng(i)) for i in range(3)])  # [T, 4, 4]
    rays = plucker_embedding(K_TEST, poses, 16, 24)
    assert rays.shape == (3, 6, 16, 24) and rays.dtype == torch.float32
    moment, d = rays[:, :3], rays[:, 3:]
    # pixel (10, 7) has its centre on the principal point: its ray is the camera's forward (z) axis
    torch.testing.assert_close(d[:, :, 7, 10], poses[:, :3, 2].float(), atol=1e-6, rtol=0)
    # one pixel right / down of it the ray turns towards the camera's x / y axis (OpenCV)
    assert torch.all(((d[:, :, 7, 11] - d[:, :, 7, 10]) * poses[:, :3, 0].float()).sum(1) > 0)
    assert torch.all(((d[:, :, 8, 10] - d[:, :, 7, 10]) * poses[:, :3, 1].float()).sum(1) > 0)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(3, 16, 24), atol=1e-6, rtol=0)
    assert (moment * d).sum(1).abs().max() < 1e-5
    o = poses[:, :3, 3].float()[:, :, None, None].expand_as(d)
    torch.testing.assert_close(moment, torch.linalg.cross(o, d, dim=1), atol=1e-5, rtol=0)


def test_translation_changes_moments_not_directions():
    pose = random_pose(np.random.default_rng(3))
    moved = pose.clone()
    moved[:3, 3] += torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    rays = plucker_embedding(K_TEST, torch.stack([pose, moved]), 16, 24)
    torch.testing.assert_close(rays[0, 3:], rays[1, 3:])
    assert (rays[0, :3] - rays[1, :3]).abs().max() > 0.1


def test_plucker_batches_and_per_clip_intrinsics():
    poses = torch.stack(
        [torch.stack([random_pose(np.random.default_rng(10 * b + t)) for t in range(2)]) for b in range(3)]
    )
    Ks = torch.stack([scale_intrinsics(K_TEST, s, s) for s in (1.0, 0.5, 2.0)])
    rays = plucker_embedding(Ks, poses, 8, 12)
    assert rays.shape == (3, 2, 6, 8, 12)
    for b in range(3):
        torch.testing.assert_close(rays[b], plucker_embedding(Ks[b], poses[b], 8, 12))


def test_scale_intrinsics_gives_the_rays_of_the_low_resolution_pixels():
    K = torch.tensor([[40.0, 0.0, 31.0], [0.0, 44.0, 33.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    pose = random_pose(np.random.default_rng(4))[None]
    high = plucker_embedding(K, pose, 64, 64)[0, 3:].double()  # [3, 64, 64]
    low = plucker_embedding(scale_intrinsics(K, 1 / 8, 1 / 8), pose, 8, 8)[0, 3:].double()
    # the low-resolution pixel's ray goes through the centre of its 8x8 block: the mean, on the
    # image plane z = 1, of the block's 64 pixel-centre rays
    cam = torch.einsum("ji,jhw->ihw", pose[0, :3, :3], high)
    plane = (cam / cam[2:]).reshape(3, 8, 8, 8, 8).mean(dim=(2, 4))
    expected = torch.einsum("ij,jhw->ihw", pose[0, :3, :3], plane / plane.norm(dim=0))
    torch.testing.assert_close(low, expected, atol=1e-6, rtol=0)


def test_relative_to_first_starts_at_identity_and_ignores_the_world_frame():
    poses = torch.stack([random_pose(np.random.default_rng(i)) for i in range(4)])[None]
    relative = relative_to_first(poses)
    torch.testing.assert_close(relative[0, 0], torch.eye(4, dtype=torch.float64))
    world = random_pose(np.random.default_rng(99))
    torch.testing.assert_close(relative_to_first(world @ poses), relative)
    torch.testing.assert_close(poses[0, 0] @ relative[0], poses[0])


def test_renderer_and_rays_agree_on_where_a_point_is_seen():
    red = Sphere(centre=(1.0, -0.5, 0.6), radius=0.3, colour=(255, 0, 0), colour_name="red")
    scene = CameraScene(
        checker=1.0, ground_colours=((120, 120, 120), (110, 110, 110)), sun=(0.0, 0.0, 1.0), spheres=(red,)
    )
    K = np.array([[40.0, 0.0, 32.0], [0.0, 40.0, 32.0], [0.0, 0.0, 1.0]])
    pose = look_at([6.0, 2.0, 2.5], [0.0, 0.0, 0.3])
    frame = render_camera_scene(scene, K, pose[None], 64, 64)[0].astype(int)
    mask = frame[..., 0] - frame[..., 1] > 60
    assert mask.sum() > 10
    rows, cols = np.nonzero(mask)
    cam = pose[:3, :3].T @ (np.array(red.centre) - pose[:3, 3])
    projected = (K @ cam)[:2] / cam[2]  # continuous image coordinates of the centre
    assert abs(cols.mean() + 0.5 - projected[0]) < 1.0 and abs(rows.mean() + 0.5 - projected[1]) < 1.0
    # the Plücker ray of the pixel nearest that point passes within the sphere
    rays = plucker_embedding(torch.tensor(K), torch.tensor(pose)[None], 64, 64)[0].double()
    u, v = int(projected[0]), int(projected[1])
    m, d = rays[:3, v, u], rays[3:, v, u]
    distance = torch.linalg.cross(torch.tensor(red.centre, dtype=torch.float64), d, dim=0) - m
    assert distance.norm() < red.radius


@pytest.mark.parametrize("kind", ["orbit", "dolly", "pan", "truck"])
def test_camera_paths_move_as_named(kind):
    poses, _ = camera_path(np.random.default_rng(0), kind, 9)
    rotations, centres = poses[:, :3, :3], poses[:, :3, 3]
    np.testing.assert_allclose(
        rotations @ rotations.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (9, 3, 3)), atol=1e-9
    )
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-9)
    moved = np.linalg.norm(centres - centres[0], axis=1).max()
    turned = np.abs(rotations - rotations[0]).max()
    if kind in ("dolly", "truck"):
        assert turned < 1e-9 and moved > 0.5
    elif kind == "pan":
        assert moved < 1e-9 and turned > 0.1
    else:
        assert moved > 0.5 and turned > 0.1
        radius = np.linalg.norm(centres[:, :2], axis=1)
        np.testing.assert_allclose(radius, radius[0])
    if kind == "dolly":  # along the viewing direction
        step = (centres[-1] - centres[0]) / np.linalg.norm(centres[-1] - centres[0])
        assert abs(abs(step @ rotations[0][:, 2]) - 1) < 1e-9


def test_camera_episodes_are_deterministic_and_the_view_follows_the_camera():
    episodes = camera_episodes(4, CAMERA, seed=3)
    again = camera_episodes(2, CAMERA, seed=3)
    for a, b in zip(episodes, again):
        assert np.array_equal(a.video, b.video) and np.array_equal(a.cam_to_world, b.cam_to_world)
        assert a.prompt == b.prompt and a.prompt.startswith("a camera ")
    assert not np.array_equal(camera_episodes(1, CAMERA, seed=4)[0].video, episodes[0].video)
    e = episodes[0]
    assert (
        e.video.shape == (9, 32, 32, 3) and e.intrinsics.shape == (3, 3) and e.cam_to_world.shape == (9, 4, 4)
    )
    for e in episodes:
        assert mean_abs_diff(e.video[0], e.video[-1]) > 2.0
    # the same camera sees the same frame, whatever the other frames of the clip are
    still = np.repeat(e.cam_to_world[:1], 3, axis=0)
    frames = render_camera_scene(e.scene, e.intrinsics, still, 32, 32, supersample=CAMERA.supersample)
    assert all(np.array_equal(f, e.video[0]) for f in frames)


# ------------------------------------------------------------------------------------ datamodule


def make_dm(kind="push", **kw):
    args = {
        "kind": kind,
        "num_frames": 9,
        "size": 32,
        "micro_batch_size": 2,
        "train_episodes": 8,
        "val_episodes": 2,
        "seed": 3,
    }
    dm = EnvironmentDataModule(**{**args, **kw})
    dm.setup("fit")
    return dm


def test_push_batches():
    dm = make_dm()
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (2, 3, 9, 32, 32) and batch["video"].dtype == torch.float32
    assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0
    assert batch["actions"].shape == (2, 8, 2) and batch["actions"].dtype == torch.float32
    assert batch["states"].shape == (2, 9, 4)
    assert batch["fps"].tolist() == [8.0, 8.0]
    assert len(batch["prompt"]) == 2 and all(" pushed around on a " in p for p in batch["prompt"])
    # a sample is its generated episode
    episodes = push_episodes(8, dataclasses.replace(PUSH, frames=9), seed=3)
    index = int(batch["ids"][0].removeprefix("push_train"))
    expected = torch.from_numpy(episodes[index].video).permute(3, 0, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(batch["video"][0], expected)
    assert torch.equal(batch["actions"][0], torch.from_numpy(episodes[index].actions))
    assert batch["prompt"][0] == episodes[index].prompt
    # validation episodes are others
    val = next(iter(dm.val_dataloader()))
    assert all(not torch.equal(v, dm.train_dataset[i]["video"]) for v in val["video"] for i in range(8))
    assert make_dm(prompt="").train_dataset[0]["prompt"] == ""


def test_camera_batches_and_cache(tmp_path):
    dm = make_dm("camera", cache_dir=str(tmp_path))
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (2, 3, 9, 32, 32)
    assert batch["intrinsics"].shape == (2, 3, 3) and batch["cam_to_world"].shape == (2, 9, 4, 4)
    assert all(p.startswith("a camera ") for p in batch["prompt"])
    assert len(list((tmp_path / "world_environments").glob("camera_*.npz"))) == 2  # train and val
    cached = make_dm("camera", cache_dir=str(tmp_path))
    for a, b in zip(dm.train_dataset.episodes, cached.train_dataset.episodes):
        assert np.array_equal(a.video, b.video) and np.array_equal(a.cam_to_world, b.cam_to_world)
        assert a.scene == b.scene and a.prompt == b.prompt
    pushed = make_dm(cache_dir=str(tmp_path))
    for a, b in zip(make_dm().train_dataset.episodes, pushed.train_dataset.episodes):
        assert np.array_equal(a.video, b.video) and a.scene == b.scene
    rays = plucker_embedding(batch["intrinsics"], relative_to_first(batch["cam_to_world"]), 4, 4)
    assert rays.shape == (2, 9, 6, 4, 4)


def read_epoch(num_workers, *, epoch=None, state=None, save_after=None):
    """One epoch's batches from a new DataModule's loader (in ``epoch``, or resumed from ``state``),
    and the loader state after ``save_after`` batches."""
    loader = make_dm(num_workers=num_workers).train_dataloader()
    if state is None:
        loader.sampler.set_epoch(epoch)
    else:
        loader.load_state_dict(state)  # Lightning restores the state, then iterates; no set_epoch first
    batches, saved = [], None
    for batch in loader:
        batches.append(batch)
        if len(batches) == save_after:
            saved = loader.state_dict()
    del loader
    gc.collect()  # its worker processes end before another loader's fork: else shutdowns time out
    return batches, saved


@pytest.mark.parametrize(("epoch", "num_workers"), [(0, 0), (1, 0), (1, 2)])
def test_resume_mid_epoch_gives_the_uninterrupted_batches(epoch, num_workers):
    expected, state = read_epoch(num_workers, epoch=epoch, save_after=1)
    assert len(expected) == 4
    got, _ = read_epoch(num_workers, state=state)
    assert len(got) == 3
    for a, b in zip(expected[1:], got):
        assert a["ids"] == b["ids"] and a["prompt"] == b["prompt"]
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["actions"], b["actions"])
    next_epoch, _ = read_epoch(0, epoch=epoch + 1)
    orders = [[i for batch in batches for i in batch["ids"]] for batches in (expected, next_epoch)]
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])  # reshuffled per epoch


def test_dp_ranks_get_disjoint_episodes():
    shares = []
    for rank in range(2):
        dm = EnvironmentDataModule(num_frames=5, size=16, micro_batch_size=2, train_episodes=8, seed=1)
        dm.dp_rank, dm.dp_size = rank, 2
        dm.setup("fit")
        shares.append({i for batch in dm.train_dataloader() for i in batch["ids"]})
    assert len(shares[0]) == len(shares[1]) == 4 and not shares[0] & shares[1]


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="frictoin"):
        EnvironmentDataModule(env={"frictoin": 0.2})
    with pytest.raises(ConfigError, match="size"):
        EnvironmentDataModule(env={"size": 16})
    with pytest.raises(ConfigError, match="kind"):
        EnvironmentDataModule(kind="walk")
    with pytest.raises(ConfigError, match="friction"):
        EnvironmentDataModule(env={"friction": 1.5})
    with pytest.raises(ConfigError, match="micro_batch_size"):
        make_dm(train_episodes=2, micro_batch_size=4)
    assert EnvironmentDataModule(kind="camera", env={"paths": ["orbit"]}).env_config.paths == ("orbit",)
    assert math.isclose(EnvironmentDataModule(env={"friction": 0.2}).env_config.friction, 0.2)

import cv2
import numpy as np
import pytest
import torch

from cupola.collections.world.guardrails import (
    DEFAULT_BLOCKLIST,
    FaceBlurConfig,
    Guardrails,
    PromptGuard,
    PromptGuardConfig,
    PromptRefused,
    blur_faces,
)
from cupola.toolkit.config import ConfigError

# ---------------------------------------------------------------- prompt blocklist


@pytest.fixture(scope="module")
def guard():
    return PromptGuard()


@pytest.mark.parametrize(
    "prompt",
    [
        "A man killing a robot in the rain",
        "the robot killed the farmer",
        "It kills everything",
        "KILL THEM ALL",
        "ｋｉｌｌｉｎｇ in full-width letters",
        "kílling with an accent",
        "ki\u200bll with a zero-width space",
        "K I L L, spelled out",
        "k.i.l.l, dotted",
    ],
)
def test_inflected_and_disguised_forms_are_refused(guard, prompt):
    verdict = guard.check(prompt)
    assert not verdict.allowed
    assert verdict.terms == ("kill",)


@pytest.mark.parametrize(
    "prompt",
    [
        "A skilled welder at work, skillful hands",
        "Painkiller bottles on a shelf, a killer whale breaching",
        "Storage racks in a stable, an establishment",
        "A child flies a kite, a debate on abuse of power",  # "child abuse" words, not side by side
        "The camera pans over a quiet street at dawn",
    ],
)
def test_innocent_prompts_pass(guard, prompt):
    verdict = guard.check(prompt)
    assert verdict.allowed, verdict.message
    assert verdict.matches == ()


@pytest.mark.parametrize("prompt", ["child abuse", "Abused children!", "a child-abuse scene", "CHILD ABUSES"])
def test_phrases_match_inflected_words_side_by_side(guard, prompt):
    assert guard.check(prompt).terms == ("child abuse",)


def test_refusal_names_terms_and_the_way_out(guard):
    with pytest.raises(PromptRefused) as info:
        guard.enforce("Soldiers beheaded a prisoner and abused children")
    message = str(info.value)
    assert "'behead' (as 'beheaded')" in message
    assert "'child abuse' (as 'abused children')" in message
    assert "allow=" in message and "enabled=False" in message and str(DEFAULT_BLOCKLIST) in message
    assert isinstance(info.value, ValueError)
    assert info.value.verdict.terms == ("behead", "child abuse")


def test_allowed_prompt_is_returned_by_enforce(guard):
    assert guard.enforce("a robot arm stacks red cubes").allowed


def test_extra_terms_extend_the_default_list():
    guard = PromptGuard(PromptGuardConfig(extra_terms=["zombie", "acid attack"]))
    assert guard.check("Zombies walk down the road").terms == ("zombie",)
    assert guard.check("two acid attacks").terms == ("acid attack",)
    assert guard.check("killing spree").terms == ("kill",)  # defaults still apply


def test_blocklist_replaces_the_default(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my own list\nbanana   # fruit\n\nhot dog\n")
    guard = PromptGuard(PromptGuardConfig(blocklist=path))
    assert guard.check("peeled bananas").terms == ("banana",)
    assert guard.check("Hot dogs at a stand").terms == ("hot dog",)
    assert guard.check("killing time").allowed
    assert PromptGuard(PromptGuardConfig(blocklist=["banana"])).check("a Banana").terms == ("banana",)


def test_allow_list_lets_terms_and_phrases_through():
    word = PromptGuard(PromptGuardConfig(allow=["kill"]))
    assert word.check("a robot killed the lights").allowed
    assert not word.check("beheaded statue").allowed

    phrase = PromptGuard(PromptGuardConfig(allow=["kill switch"]))
    assert phrase.check("he hits the kill switch").allowed
    assert phrase.check("kill switches on every machine").allowed
    assert phrase.check("kill the operator, then the kill switch").terms == ("kill",)


def test_disabled_guard_lets_everything_through():
    guard = PromptGuard(PromptGuardConfig(enabled=False))
    assert guard.enforce("killing and child abuse").allowed


def test_other_languages_lemmatise_in_their_language():
    guard = PromptGuard(PromptGuardConfig(blocklist=["töten"], language="de"))
    assert guard.check("Der Roboter tötete, er hat getötet").terms == ("töten",)
    assert guard.check("Der Roboter tötet").matches[0].text == "tötet"
    assert guard.check("Ein Roboter tanzt").allowed


def test_bad_configuration_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="language"):
        PromptGuard(PromptGuardConfig(language="xx"))
    with pytest.raises(ConfigError, match="no such file"):
        PromptGuard(PromptGuardConfig(blocklist=tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="no words"):
        PromptGuard(PromptGuardConfig(extra_terms=["!!!"]))


# ---------------------------------------------------------------- face blurring
#
# Faces are drawn procedurally: a shaded skin-toned ellipse with dark eye sockets and pupils,
# brows, a nose shadow and a mouth, slightly blurred — enough for OpenCV's frontal cascade.

H, W, FACE = 160, 224, 64


def render_face(size: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB float face of ``size`` x ``size`` pixels, and the mask of its oval."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    r2 = ((xx - 0.5) / 0.40) ** 2 + ((yy - 0.52) / 0.50) ** 2
    oval = r2 <= 1
    grey = np.where(oval, 200 - 60 * r2, 0).astype(np.float32)

    def dab(cx, cy, rx, ry, value):
        grey[(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1) & oval] = value

    for cx in (0.33, 0.67):
        dab(cx, 0.40, 0.10, 0.05, 60)  # eye socket
        dab(cx, 0.40, 0.04, 0.035, 20)  # pupil
        dab(cx, 0.30, 0.12, 0.025, 70)  # brow
    dab(0.5, 0.60, 0.05, 0.03, 110)  # nose shadow
    dab(0.5, 0.76, 0.14, 0.035, 60)  # mouth
    grey = cv2.GaussianBlur(grey, (0, 0), size / 60)
    skin = np.array([1.0, 0.82, 0.68], np.float32)
    return grey[..., None] * skin, oval


def background(seed: int) -> np.ndarray:
    """A textured RGB frame: smoothed colour noise (plenty of high frequencies, no faces)."""
    noise = np.random.default_rng(seed).uniform(0, 255, (H, W, 3)).astype(np.float32)
    return cv2.GaussianBlur(noise, (0, 0), 1.5)


def with_face(frame: np.ndarray, top: int, left: int, size: int = FACE) -> np.ndarray:
    face, oval = render_face(size)
    frame = frame.copy()
    frame[top : top + size, left : left + size][oval] = face[oval]
    return frame


def to_uint8(frames) -> np.ndarray:
    return np.clip(np.stack(frames), 0, 255).round().astype(np.uint8)


def detail(region: np.ndarray) -> float:
    """High-frequency energy: the variance of the Laplacian of the grey image."""
    grey = cv2.cvtColor(np.ascontiguousarray(region), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def covered(boxes, H=H, W=W) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    for b in boxes:
        mask[b.slices] = True
    return mask


POSITIONS = [(30, 20), (40, 60), (50, 100), (40, 140), (30, 150)]  # a face moving across the frame


@pytest.fixture(scope="module")
def moving_face():
    video = to_uint8([with_face(background(t), top, left) for t, (top, left) in enumerate(POSITIONS)])
    blurred, boxes = blur_faces(video, FaceBlurConfig())
    return video, blurred, boxes


def test_generated_faces_are_found_and_blurred_in_every_frame(moving_face):
    video, blurred, boxes = moving_face
    assert blurred.shape == video.shape and blurred.dtype == np.uint8
    for t, (top, left) in enumerate(POSITIONS):
        own = [b for b in boxes[t] if b.source_frame == t]
        assert own, f"no face detected in frame {t}"
        face = (slice(top, top + FACE), slice(left, left + FACE))
        assert covered(boxes[t])[face].all(), "the whole face (and its margin) is blurred"
        assert detail(blurred[t][face]) < 0.1 * detail(video[t][face])


def test_pixels_outside_blurred_boxes_are_bit_identical(moving_face):
    video, blurred, boxes = moving_face
    for t in range(len(video)):
        outside = ~covered(boxes[t])
        assert outside.mean() > 0.3  # the test is not vacuous
        np.testing.assert_array_equal(blurred[t][outside], video[t][outside])
    assert not np.shares_memory(blurred, video)


def test_frames_without_faces_are_unchanged():
    video = to_uint8([background(10 + t) for t in range(3)])
    blurred, boxes = blur_faces(video, FaceBlurConfig(profile=True))
    assert boxes == [[], [], []]
    np.testing.assert_array_equal(blurred, video)


def test_temporal_dilation_blurs_a_frame_where_the_face_is_missed():
    # frame 2: something passes in front of the eyes and the cascade no longer sees a face there
    top, left = 48, 80
    frames = [with_face(background(20 + t), top, left) for t in range(5)]
    eyes = (slice(top + 16, top + 40), slice(left, left + FACE))
    frames[2][eyes] = background(99)[eyes]
    video = to_uint8(frames)
    face = (slice(top, top + FACE), slice(left, left + FACE))

    _, undilated = blur_faces(video, FaceBlurConfig(temporal_dilation=0))
    assert undilated[2] == [] and all(undilated[t] for t in (0, 1, 3, 4)), "precondition: frame 2 is missed"

    blurred, boxes = blur_faces(video, FaceBlurConfig(temporal_dilation=1))
    assert boxes[2] and all(b.source_frame in (1, 3) for b in boxes[2])
    assert covered(boxes[2])[face].all()
    assert detail(blurred[2][face]) < 0.1 * detail(video[2][face])


def test_pixelate_mode_and_torch_tensors():
    video = to_uint8([with_face(background(30), 40, 80)])
    tensor = torch.from_numpy(video)
    blurred, boxes = blur_faces(tensor, FaceBlurConfig(mode="pixelate", strength=0.2))
    assert isinstance(blurred, torch.Tensor) and blurred.dtype == torch.uint8
    assert boxes[0]
    region = blurred[0].numpy()[boxes[0][0].slices]
    assert len(np.unique(region.reshape(-1, 3), axis=0)) <= 36  # a handful of flat blocks, no detail
    outside = ~covered(boxes[0])
    assert torch.equal(blurred[0][torch.from_numpy(outside)], tensor[0][torch.from_numpy(outside)])


def test_wrong_inputs_name_the_fix():
    with pytest.raises(ValueError, match="uint8"):
        blur_faces(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="permute"):
        blur_faces(np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(ConfigError, match="mode"):
        blur_faces(np.zeros((1, 32, 32, 3), np.uint8), FaceBlurConfig(mode="smudge"))


# ---------------------------------------------------------------- the facade


def test_guardrails_facade(moving_face):
    video, blurred, _ = moving_face
    rails = Guardrails()
    with pytest.raises(PromptRefused, match="'kill'"):
        rails.check_prompt("a drone kills a deer")
    assert rails.check_prompt("a drone films a deer").allowed

    out, report = rails.postprocess(video)
    np.testing.assert_array_equal(out, blurred)
    assert report["frames"] == report["frames_with_faces"] == report["frames_blurred"] == len(POSITIONS)
    assert report["faces_detected"] >= len(POSITIONS)
    assert len(report["boxes"]) == len(POSITIONS)

    off = Guardrails.disabled()
    assert off.check_prompt("a drone kills a deer").allowed
    same, report = off.postprocess(video)
    assert same is video and report["face_blur"] is False and report["boxes_blurred"] == 0

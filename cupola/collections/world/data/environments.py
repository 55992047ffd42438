"""Generated environments with known dynamics and known cameras, for post-training video world
models into action- and camera-conditioned ones — and for measuring what the conditioning buys.

**Push** (:func:`push_episodes`): a top-down view of one object (a disc or a square; colour and
size per episode) on a static, mildly textured floor (wooden planks, tiles or concrete), pushed by
actions. The object starts at rest, so the first frame says nothing about where it goes; the
first frame *and* the actions determine every later frame (:func:`rollout` renders the ground
truth for any actions). Coordinates are fractions of the frame side (``x`` right, ``y`` down,
``(0, 0)`` the top-left corner), so the same actions move the object alike at 32 or 64 pixels.
State ``(x, y, vx, vy)``; action ``a_t`` in the unit disc; the transition from frame ``t`` to
``t + 1`` (:func:`simulate`)::

    v <- (1 - friction) * v + action_scale * a_t,  then |v| capped at max_speed
    p <- p + v,  then reflected (elastically, velocity component flipped) at the walls

— walls at ``radius`` from the frame edges, so the object stays wholly inside the frame. The
policy holds an action (a random direction, magnitude 0.3-1, or now and then none) for a few
steps, then draws the next. Edges are anti-aliased (exact pixel coverage), so sub-pixel motion
shows.

**Camera scene** (:func:`camera_episodes`): a static 3D scene — a checkered ground plane and 3 to 5
coloured spheres and boxes, a sun with shadows and a sky — ray-cast in numpy from a known camera
path per episode: ``"orbit"`` around the scene, ``"dolly"`` in or out, ``"pan"`` (yaw in place) or
``"truck"`` (sideways). World frame: ``z`` up, the ground is ``z = 0``, the scene is centred on the
origin. Cameras follow OpenCV (``x`` right, ``y`` down, ``z`` forward; ``cam_to_world`` columns
are the camera axes and centre in world coordinates; pixel ``(u, v)`` has its centre at
``(u + 0.5, v + 0.5)``), the conventions of :mod:`~cupola.collections.world.data.camera`, whose
:func:`~cupola.collections.world.data.camera.plucker_embedding` turns an episode's
``intrinsics`` and ``cam_to_world`` into the per-pixel rays a camera-conditioned model takes.

**Training samples** (:class:`EnvironmentDataModule`)::

    video         float32 [B, 3, T, H, W]  in [-1, 1]
    fps           float32 [B]
    prompt        list[str]                 a description of each episode ("a red disc pushed ...")
    ids           list[str]
    push:   actions  float32 [B, T - 1, 2]  action t drives frame t -> t + 1; |a| <= 1
            states   float32 [B, T, 4]      (x, y, vx, vy), fractions of the frame side
    camera: intrinsics    float32 [B, 3, 3]     pixels of the H x W frames
            cam_to_world  float32 [B, T, 4, 4]  OpenCV axes, world z up

Every episode is a function of ``(seed, episode index)`` alone (numpy ``default_rng``), so a
dataset's first episodes do not depend on how many it has.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cupola.collections.world.data.clips import _check_int
from cupola.collections.world.data.datamodule import ShardedLoaders
from cupola.toolkit.config import check_choice, config_error, from_dict

__all__ = [
    "ENVIRONMENT_KINDS",
    "Box",
    "CameraEpisode",
    "CameraScene",
    "CameraSceneConfig",
    "EnvironmentDataModule",
    "EpisodeDataset",
    "PushEnvConfig",
    "PushEpisode",
    "PushScene",
    "Sphere",
    "camera_episodes",
    "camera_intrinsics",
    "camera_path",
    "collate_episodes",
    "generate_episodes",
    "look_at",
    "push_episodes",
    "random_camera_scene",
    "random_push_scene",
    "render_camera_scene",
    "render_push",
    "rollout",
    "simulate",
]

FPS = 8.0
ENVIRONMENT_KINDS = ("push", "camera")
# bump when generation changes: cached episodes are keyed by it
GENERATOR_VERSION = 1
# validation episodes are episodes VAL_START, VAL_START + 1, ... of the DataModule's seed: never
# among the training episodes (0, 1, ...)
VAL_START = 1 << 31

# named so that prompts can say what is seen; each episode jitters the shade a little
COLOURS = {
    "red": (215, 40, 40),
    "orange": (240, 135, 30),
    "yellow": (235, 205, 45),
    "green": (45, 175, 65),
    "cyan": (40, 195, 210),
    "blue": (45, 85, 220),
    "purple": (145, 60, 190),
    "pink": (235, 110, 175),
    "white": (238, 238, 238),
}
PUSH_SHAPES = ("disc", "square")
FLOORS = ("wooden", "tiled", "concrete")
CAMERA_PATHS = ("orbit", "dolly", "pan", "truck")


def _named_colour(rng: np.random.Generator) -> tuple[str, tuple[int, int, int]]:
    name = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    rgb = np.clip(np.array(COLOURS[name]) + rng.integers(-12, 13, size=3), 0, 255)
    return name, tuple(int(c) for c in rgb)


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _upsampled_noise(rng: np.random.Generator, cells: tuple[int, int], size: int) -> np.ndarray:
    """``float32 [size, size]``: unit Gaussian noise on a ``cells = (rows, cols)`` grid, bilinearly
    upsampled — a texture defined in fractions of the frame, alike at any ``size``."""
    grid = rng.standard_normal(cells).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BILINEAR))


def _seam(coords: np.ndarray, period: float, width: float) -> np.ndarray:
    """Anti-aliased lines ``width`` pixels wide every ``period`` pixels along ``coords`` (pixel
    centres): 1 on a line, 0 off it."""
    distance = np.abs((coords + period / 2) % period - period / 2)
    return np.clip(width / 2 + 0.5 - distance, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Push


@dataclass(kw_only=True, slots=True)
class PushEnvConfig:
    """The push environment and its episode policy; lengths are fractions of the frame side."""

    size: int = 64  # frame side, pixels
    frames: int = 17  # frames per episode (actions: frames - 1)
    fps: float = FPS
    action_scale: float = 0.012  # velocity change of a unit action, frame sides per frame
    friction: float = 0.1  # fraction of the velocity lost every frame
    max_speed: float = 0.06  # frame sides per frame (3.8 px per frame at 64 px)
    radius: tuple[float, float] = (0.08, 0.14)  # object radius (half side for a square), drawn per episode
    shapes: tuple[str, ...] = PUSH_SHAPES
    hold_steps: tuple[int, int] = (2, 5)  # the policy holds each action for this many steps (inclusive)
    idle_prob: float = 0.15  # chance that a held action is "no push"

    def validate(self) -> None:
        _check_int(self, "size", self.size, 8)
        _check_int(self, "frames", self.frames, 2)
        for name in ("fps", "action_scale", "max_speed"):
            if not getattr(self, name) > 0:
                raise config_error(self, name, getattr(self, name), "must be > 0")
        if not 0 <= self.friction < 1:
            raise config_error(self, "friction", self.friction, "must be in [0, 1)")
        low, high = self.radius
        if not 0 < low <= high < 0.5:
            raise config_error(self, "radius", self.radius, "must be (low, high) with 0 < low <= high < 0.5")
        if self.max_speed >= 1 - 2 * high:
            raise config_error(
                self, "max_speed", self.max_speed, f"must be below 1 - 2 * radius[1] = {1 - 2 * high:.3f}"
            )
        if not self.shapes or any(s not in PUSH_SHAPES for s in self.shapes):
            raise config_error(self, "shapes", self.shapes, f"choose a non-empty subset of {PUSH_SHAPES}")
        if not 1 <= self.hold_steps[0] <= self.hold_steps[1]:
            raise config_error(
                self, "hold_steps", self.hold_steps, "must be (low, high) with 1 <= low <= high"
            )
        if not 0 <= self.idle_prob < 1:
            raise config_error(self, "idle_prob", self.idle_prob, "must be in [0, 1)")


@dataclass(kw_only=True, slots=True, frozen=True)
class PushScene:
    """What a push episode looks like and where it starts: with the actions, all its frames."""

    shape: str  # "disc" or "square"
    colour_name: str
    colour: tuple[int, int, int]  # RGB
    radius: float  # frame sides; half the side of a square
    floor: str  # "wooden", "tiled" or "concrete"
    floor_seed: int  # the floor's texture
    start: tuple[float, float, float, float]  # (x, y, vx, vy) of frame 0

    @property
    def prompt(self) -> str:
        return f"{_a(self.colour_name)} {self.shape} pushed around on a {self.floor} floor"


@dataclass(eq=False, slots=True)
class PushEpisode:
    video: np.ndarray  # uint8 [T, H, W, 3]
    actions: np.ndarray  # float32 [T - 1, 2]: action t drives frame t -> t + 1
    states: np.ndarray  # float32 [T, 4]: (x, y, vx, vy) of each frame
    scene: PushScene

    @property
    def prompt(self) -> str:
        return self.scene.prompt

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"actions": torch.from_numpy(self.actions), "states": torch.from_numpy(self.states)}


def random_push_scene(rng: np.random.Generator, config: PushEnvConfig) -> PushScene:
    """An object of random shape, colour and size at rest somewhere on a random floor."""
    shape = config.shapes[int(rng.integers(len(config.shapes)))]
    colour_name, colour = _named_colour(rng)
    radius = float(rng.uniform(*config.radius))
    floor = FLOORS[int(rng.integers(len(FLOORS)))]
    x, y = rng.uniform(radius, 1 - radius, size=2)
    return PushScene(
        shape=shape,
        colour_name=colour_name,
        colour=colour,
        radius=radius,
        floor=floor,
        floor_seed=int(rng.integers(2**31)),
        start=(float(x), float(y), 0.0, 0.0),
    )


def _policy(rng: np.random.Generator, config: PushEnvConfig) -> np.ndarray:
    """``float32 [frames - 1, 2]``: piecewise-constant pushes, each held ``hold_steps`` steps."""
    actions = np.zeros((config.frames - 1, 2), dtype=np.float32)
    t = 0
    while t < len(actions):
        hold = int(rng.integers(config.hold_steps[0], config.hold_steps[1] + 1))
        angle, magnitude = rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 1.0)
        if rng.uniform() >= config.idle_prob:
            actions[t : t + hold] = magnitude * math.cos(angle), magnitude * math.sin(angle)
        t += hold
    return actions


def simulate(config: PushEnvConfig, scene: PushScene, actions: np.ndarray) -> np.ndarray:
    """States ``float32 [len(actions) + 1, 4]`` — ``(x, y, vx, vy)`` — from ``scene.start`` under
    ``actions`` ``[N, 2]`` (the module docstring's dynamics). An action longer than 1 is scaled
    onto the unit circle: the environment's push is bounded."""
    actions = np.asarray(actions, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[1] != 2:
        raise ValueError(f"actions must be [N, 2] (N transitions); got {list(actions.shape)}")
    norms = np.linalg.norm(actions, axis=1, keepdims=True)
    actions = actions / np.maximum(norms, 1.0)
    low, high = scene.radius, 1.0 - scene.radius
    p, v = np.array(scene.start[:2], dtype=np.float64), np.array(scene.start[2:], dtype=np.float64)
    states = [np.concatenate([p, v])]
    for a in actions:
        v = (1.0 - config.friction) * v + config.action_scale * a
        speed = float(np.hypot(*v))
        if speed > config.max_speed:
            v *= config.max_speed / speed
        p = p + v
        for axis in range(2):  # one reflection suffices: max_speed < 1 - 2 * radius
            if p[axis] < low:
                p[axis], v[axis] = 2 * low - p[axis], -v[axis]
            elif p[axis] > high:
                p[axis], v[axis] = 2 * high - p[axis], -v[axis]
        states.append(np.concatenate([p, v]))
    return np.stack(states).astype(np.float32)


def _push_floor(kind: str, seed: int, size: int) -> np.ndarray:
    """``float64 [size, size, 3]`` in [0, 1]: a floor texture defined in fractions of the frame."""
    rng = np.random.default_rng(seed)
    centres = np.arange(size) + 0.5
    if kind == "wooden":
        base = colorsys.hsv_to_rgb(rng.uniform(0.06, 0.1), rng.uniform(0.45, 0.65), rng.uniform(0.45, 0.7))
        planks = int(rng.integers(4, 7))
        row = np.minimum((centres * planks / size).astype(int), planks - 1)
        shade = 0.07 * rng.standard_normal(planks)[row][:, None]  # each plank its own shade
        grain = 0.05 * _upsampled_noise(rng, (planks * 8, 3), size)  # streaks along the planks
        seams = 0.3 * _seam(centres, size / planks, size / 64)[:, None]
        pattern = shade + grain - seams
    elif kind == "tiled":
        base = colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.2), rng.uniform(0.6, 0.8))
        tiles = int(rng.integers(3, 6))
        cell = np.minimum((centres * tiles / size).astype(int), tiles - 1)
        shade = 0.05 * rng.standard_normal((tiles, tiles))[cell[:, None], cell[None, :]]
        grout = _seam(centres, size / tiles, size / 48)
        pattern = (
            shade + 0.02 * _upsampled_noise(rng, (16, 16), size) - 0.3 * np.maximum(grout[:, None], grout)
        )
    else:  # concrete
        base = colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.1), rng.uniform(0.45, 0.65))
        pattern = 0.05 * _upsampled_noise(rng, (6, 6), size) + 0.03 * _upsampled_noise(rng, (20, 20), size)
    return np.clip(np.array(base)[None, None, :] * (1.0 + pattern[..., None]), 0.0, 1.0)


def _interval_coverage(edges: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``[T, size]``: how much of each pixel ``[e, e + 1)`` the intervals ``[low_t, high_t]`` cover."""
    return np.clip(np.minimum(edges + 1, high[:, None]) - np.maximum(edges, low[:, None]), 0.0, 1.0)


def _object_coverage(
    shape: str, centres_T_2: np.ndarray, r: float, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(coverage, shading)``, each ``[T, size, size]``: the fraction of each pixel the object covers
    (exact for a square, to within a few percent for a disc) and its brightness there."""
    edges = np.arange(size, dtype=np.float64)
    x, y = centres_T_2[:, 0], centres_T_2[:, 1]
    if shape == "square":
        coverage = (
            _interval_coverage(edges, y - r, y + r)[:, :, None]
            * _interval_coverage(edges, x - r, x + r)[:, None, :]
        )
        return coverage, np.ones_like(coverage)
    dx = edges[None, None, :] + 0.5 - x[:, None, None]
    dy = edges[None, :, None] + 0.5 - y[:, None, None]
    distance = np.hypot(dx, dy)
    coverage = np.clip(r - distance + 0.5, 0.0, 1.0)
    return coverage, 1.0 - 0.25 * np.clip(distance / r, 0.0, 1.0) ** 2  # a dome, lit from above


def render_push(config: PushEnvConfig, scene: PushScene, states: np.ndarray) -> np.ndarray:
    """Frames ``uint8 [T, size, size, 3]`` of ``scene``'s object at ``states[:, :2]`` (``[T, >=2]``):
    the floor, the object's shadow (light from the top left) and the object over it."""
    size = config.size
    floor = _push_floor(scene.floor, scene.floor_seed, size)
    centres = np.asarray(states, dtype=np.float64)[:, :2] * size
    r = scene.radius * size
    shadow, _ = _object_coverage(scene.shape, centres + 0.25 * r, r, size)
    coverage, shading = _object_coverage(scene.shape, centres, r, size)
    shadow, coverage, shading = (x.astype(np.float32)[..., None] for x in (shadow, coverage, shading))
    colour = np.array(scene.colour, dtype=np.float32) / 255
    under = floor.astype(np.float32)[None] * (1.0 - 0.35 * shadow)
    frames = under * (1.0 - coverage) + (colour * shading) * coverage
    return np.round(frames * 255).astype(np.uint8)


def rollout(config: PushEnvConfig, scene: PushScene, actions: np.ndarray) -> np.ndarray:
    """The frames ``uint8 [len(actions) + 1, H, W, 3]`` that ``actions`` ``[N, 2]`` make from
    ``scene`` (its floor, object and start): the ground truth an action-conditioned model's
    prediction is scored against. ``rollout(config, e.scene, e.actions)`` equals ``e.video``."""
    return render_push(config, scene, simulate(config, scene, actions))


def push_episodes(n: int, config: PushEnvConfig, seed: int, *, start: int = 0) -> list[PushEpisode]:
    """Episodes ``start, ..., start + n - 1`` of ``seed``: episode ``k`` is drawn from
    ``default_rng((seed, k))`` — a random scene at rest, then the policy's actions."""
    config.validate()
    _check_int("push_episodes", "n", n, 0)
    episodes = []
    for k in range(start, start + n):
        rng = np.random.default_rng((seed, k))
        scene = random_push_scene(rng, config)
        actions = _policy(rng, config)
        states = simulate(config, scene, actions)
        episodes.append(PushEpisode(render_push(config, scene, states), actions, states, scene))
    return episodes


# ---------------------------------------------------------------------------------------------
# Camera scene


@dataclass(kw_only=True, slots=True)
class CameraSceneConfig:
    """Camera episodes: frame size, clip length, lens and which camera paths to draw from."""

    size: int = 64  # frame side, pixels
    frames: int = 17
    fps: float = FPS
    fov_deg: tuple[float, float] = (50.0, 70.0)  # horizontal field of view, drawn per episode
    paths: tuple[str, ...] = CAMERA_PATHS
    supersample: int = 2  # rays per pixel side, averaged (1: one ray through each pixel centre)

    def validate(self) -> None:
        _check_int(self, "size", self.size, 8)
        _check_int(self, "frames", self.frames, 1)
        _check_int(self, "supersample", self.supersample, 1)
        if not self.fps > 0:
            raise config_error(self, "fps", self.fps, "must be > 0")
        if not 1 <= self.fov_deg[0] <= self.fov_deg[1] < 170:
            raise config_error(
                self, "fov_deg", self.fov_deg, "must be (low, high) with 1 <= low <= high < 170"
            )
        if not self.paths or any(p not in CAMERA_PATHS for p in self.paths):
            raise config_error(self, "paths", self.paths, f"choose a non-empty subset of {CAMERA_PATHS}")


@dataclass(kw_only=True, slots=True, frozen=True)
class Sphere:
    centre: tuple[float, float, float]
    radius: float
    colour: tuple[int, int, int]
    colour_name: str = ""


@dataclass(kw_only=True, slots=True, frozen=True)
class Box:
    centre: tuple[float, float, float]
    half_size: tuple[float, float, float]  # along the box's own axes, before the yaw
    yaw: float  # radians, about the world z axis
    colour: tuple[int, int, int]
    colour_name: str = ""


@dataclass(kw_only=True, slots=True, frozen=True)
class CameraScene:
    """A static scene: checkered ground ``z = 0`` (squares of side ``checker``), spheres, boxes, a sun."""

    checker: float
    ground_colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    sun: tuple[float, float, float]  # unit vector towards the sun
    spheres: tuple[Sphere, ...] = ()
    boxes: tuple[Box, ...] = ()

    def describe(self) -> str:
        """``"a red sphere, a blue box and a green sphere on a checkered floor"``."""
        things = [_a(f"{s.colour_name} sphere") for s in self.spheres]
        things += [_a(f"{b.colour_name} box") for b in self.boxes]
        listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
        return f"{listed} on a checkered floor" if things else "a checkered floor"


def random_camera_scene(rng: np.random.Generator) -> CameraScene:
    """3 to 5 spheres and boxes (resting on the ground, a sphere now and then floating) centred
    within 2.5 units of the origin and (mostly) apart; a random checker and sun. Everything stays
    within 3.6 units of the origin, inside the closest camera of :func:`camera_path`."""
    light, dark = rng.uniform(0.65, 0.85), rng.uniform(0.2, 0.4)
    hue = rng.uniform()
    ground = tuple(
        tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.0, 0.25), v))
        for v in (light, dark)
    )
    elevation, azimuth = rng.uniform(math.radians(35), math.radians(65)), rng.uniform(0, 2 * math.pi)
    sun = (
        math.cos(elevation) * math.cos(azimuth),
        math.cos(elevation) * math.sin(azimuth),
        math.sin(elevation),
    )
    spheres, boxes, placed = [], [], []
    for _ in range(int(rng.integers(3, 6))):
        footprint = rng.uniform(0.35, 0.75)
        for _attempt in range(50):  # rejection sampling: objects do not overlap
            distance, angle = 2.5 * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
            x, y = distance * math.cos(angle), distance * math.sin(angle)
            if all(math.hypot(x - px, y - py) > footprint + pr + 0.2 for px, py, pr in placed):
                break
        placed.append((x, y, footprint))
        name, colour = _named_colour(rng)
        if rng.uniform() < 0.5:
            lift = rng.uniform(0.3, 0.8) if rng.uniform() < 0.25 else 0.0
            spheres.append(
                Sphere(centre=(x, y, footprint + lift), radius=footprint, colour=colour, colour_name=name)
            )
        else:
            half = (
                footprint * rng.uniform(0.6, 1.0),
                footprint * rng.uniform(0.6, 1.0),
                rng.uniform(0.3, 1.0),
            )
            boxes.append(
                Box(
                    centre=(x, y, half[2]),
                    half_size=half,
                    yaw=float(rng.uniform(0, math.pi)),
                    colour=colour,
                    colour_name=name,
                )
            )

    def as_float(values: Any) -> tuple[float, ...]:  # plain floats: scenes round-trip through JSON
        return tuple(float(v) for v in values)

    spheres = [replace(s, centre=as_float(s.centre), radius=float(s.radius)) for s in spheres]
    boxes = [replace(b, centre=as_float(b.centre), half_size=as_float(b.half_size)) for b in boxes]
    return CameraScene(
        checker=float(rng.uniform(0.5, 1.0)),
        ground_colours=ground,
        sun=as_float(sun),
        spheres=tuple(spheres),
        boxes=tuple(boxes),
    )


def look_at(
    eye: np.ndarray, target: np.ndarray, up: tuple[float, float, float] = (0.0, 0.0, 1.0)
) -> np.ndarray:
    """``cam_to_world`` ``float64 [4, 4]`` (OpenCV axes) of a camera at ``eye`` looking at ``target``,
    level (its x axis horizontal, its y axis pointing down along ``-up``)."""
    eye, target = np.asarray(eye, dtype=np.float64), np.asarray(target, dtype=np.float64)
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, eye
    return pose


def _yaw(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def camera_path(rng: np.random.Generator, kind: str, frames: int) -> tuple[np.ndarray, str]:
    """``(cam_to_world float64 [frames, 4, 4], phrase)``: a ``kind`` path (:data:`CAMERA_PATHS`)
    with random parameters, framing the scene at the origin; ``phrase`` describes the motion
    ("orbiting around")."""
    target = np.array([0.0, 0.0, 0.4])
    distance, height = rng.uniform(5.5, 7.0), rng.uniform(1.5, 3.0)  # never inside the scene's objects
    azimuth = rng.uniform(0, 2 * math.pi)
    s = np.linspace(0.0, 1.0, frames)
    sign = 1.0 if rng.uniform() < 0.5 else -1.0

    def eye_at(az: float, dist: float) -> np.ndarray:
        return np.array([dist * math.cos(az), dist * math.sin(az), height])

    if kind == "orbit":
        sweep = sign * math.radians(rng.uniform(20, 50))
        return np.stack(
            [look_at(eye_at(azimuth + sweep * t, distance), target) for t in s]
        ), "orbiting around"
    if kind == "dolly":
        inward = rng.uniform() < 0.5
        near, far = distance * rng.uniform(0.7, 0.8), distance
        start, end = (far, near) if inward else (near, far)
        pose = look_at(eye_at(azimuth, far), target)
        poses = np.repeat(pose[None], frames, axis=0)
        eye_far = pose[:3, 3]
        poses[:, :3, 3] = target + (eye_far - target)[None] * ((start + (end - start) * s) / far)[:, None]
        return poses, "moving towards" if inward else "moving away from"
    if kind == "pan":
        sweep = sign * math.radians(rng.uniform(15, 35))
        pose = look_at(eye_at(azimuth, distance), target)
        poses = np.repeat(pose[None], frames, axis=0)
        for i, t in enumerate(s):  # yaw about the world up axis through the camera centre
            poses[i, :3, :3] = _yaw(sweep * (t - 0.5)) @ pose[:3, :3]
        return poses, "panning across"
    if kind == "truck":
        shift = sign * rng.uniform(1.0, 2.0)
        pose = look_at(eye_at(azimuth, distance), target)
        poses = np.repeat(pose[None], frames, axis=0)
        poses[:, :3, 3] = pose[:3, 3] + pose[:3, 0][None] * (shift * (s - 0.5))[:, None]
        return poses, "sliding sideways past"
    raise ValueError(f"camera path {kind!r}: choose one of {CAMERA_PATHS}")


@dataclass(eq=False, slots=True)
class CameraEpisode:
    video: np.ndarray  # uint8 [T, H, W, 3]
    intrinsics: np.ndarray  # float32 [3, 3], pixels
    cam_to_world: np.ndarray  # float32 [T, 4, 4], OpenCV axes
    scene: CameraScene
    path: str  # one of CAMERA_PATHS
    prompt: str

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "intrinsics": torch.from_numpy(self.intrinsics),
            "cam_to_world": torch.from_numpy(self.cam_to_world),
        }


_SKY_HORIZON = np.array([0.85, 0.88, 0.92], dtype=np.float32)
_SKY_ZENITH = np.array([0.35, 0.55, 0.85], dtype=np.float32)
_AMBIENT, _FOG_DISTANCE, _EPS = 0.35, 40.0, 1e-4

# Rays are traced one frame at a time in float32, vectors as (x, y, z) triples of arrays or scalars
# (the frame's camera centre, the sun's direction), so every step is a flat numpy operation.
Vec = tuple[Any, Any, Any]


def _sphere_span(centre: Vec, radius: float, o: Vec, d: Vec) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit distances of rays ``o + t d`` (unit ``d``) through a sphere; NaN on a miss."""
    ocx, ocy, ocz = o[0] - centre[0], o[1] - centre[1], o[2] - centre[2]
    b = ocx * d[0] + ocy * d[1] + ocz * d[2]
    disc = b * b - (ocx * ocx + ocy * ocy + ocz * ocz - radius * radius)
    with np.errstate(invalid="ignore"):
        root = np.sqrt(disc)
    return -b - root, -b + root


def _box_span(box: Box, o: Vec, d: Vec) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit distances of rays through a box (slab method, in the box's frame); a miss
    when exit < entry (or NaN)."""
    c, s = math.cos(box.yaw), math.sin(box.yaw)
    px, py, pz = o[0] - box.centre[0], o[1] - box.centre[1], o[2] - box.centre[2]
    local_o = (c * px + s * py, c * py - s * px, pz)
    local_d = (c * d[0] + s * d[1], c * d[1] - s * d[0], d[2])
    entry, exit_ = -np.inf, np.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        for half, lo, ld in zip(box.half_size, local_o, local_d):
            inv = 1.0 / ld
            t1, t2 = (-half - lo) * inv, (half - lo) * inv
            entry, exit_ = np.maximum(entry, np.minimum(t1, t2)), np.minimum(exit_, np.maximum(t1, t2))
    return entry, exit_


def _bounds(thing: Sphere | Box) -> tuple[Vec, float]:
    if isinstance(thing, Sphere):
        return thing.centre, thing.radius
    return thing.centre, math.sqrt(sum(h * h for h in thing.half_size))


def _box_normal(box: Box, p: Vec) -> Vec:
    """Outward normals at points ``p`` on a box: the face whose slab the point is deepest out of."""
    c, s = math.cos(box.yaw), math.sin(box.yaw)
    px, py, pz = p[0] - box.centre[0], p[1] - box.centre[1], p[2] - box.centre[2]
    local = np.stack([c * px + s * py, c * py - s * px, pz])
    scaled = local / np.asarray(box.half_size, dtype=np.float32)[:, None]
    axis = np.abs(scaled).argmax(axis=0)
    n = np.zeros_like(local)
    n[axis, np.arange(local.shape[1])] = np.sign(scaled[axis, np.arange(local.shape[1])])
    return c * n[0] - s * n[1], s * n[0] + c * n[1], n[2]


def _shadowed(things: list[Sphere | Box], p: Vec, sun: Vec) -> np.ndarray:
    """Whether anything stands between points ``p`` (just off a surface) and the sun."""
    blocked = np.zeros(p[0].shape, dtype=bool)
    for thing in things:
        centre, radius = _bounds(thing)
        _, exit_ = _sphere_span(centre, radius, p, sun)
        through = exit_ > _EPS  # NaN (a miss) compares False
        if isinstance(thing, Sphere):
            blocked |= through
            continue
        idx = np.flatnonzero(through)
        entry, exit_ = _box_span(thing, tuple(x[idx] for x in p), sun)
        blocked[idx] |= (exit_ >= np.maximum(entry, 0.0)) & (exit_ > _EPS)
    return blocked


def _filtered_checker(x: np.ndarray, y: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Box-filtered checkerboard (cells of side 1) over a footprint ``width`` cells wide: 0 / 1 on
    the two colours, their mix where a sample spans many cells — no moiré towards the horizon
    (after Inigo Quilez, "filterable procedurals")."""
    w = np.maximum(width, 1e-4)

    def tri(v: np.ndarray) -> np.ndarray:
        return np.abs(v / 2 - np.floor(v / 2) - 0.5)

    ix = 2.0 * (tri(x - 0.5 * w) - tri(x + 0.5 * w)) / w
    iy = 2.0 * (tri(y - 0.5 * w) - tri(y + 0.5 * w)) / w
    return 0.5 - 0.5 * ix * iy


def _trace_frame(scene: CameraScene, o: Vec, d: Vec, sample_angle: float) -> np.ndarray:
    """Colours ``float32 [N, 3]`` in [0, 1] along rays from the camera centre ``o`` (above the
    ground) along unit directions ``d`` (three ``[N]`` arrays)."""
    things: list[Sphere | Box] = [*scene.spheres, *scene.boxes]
    n = d[0].shape[0]
    with np.errstate(divide="ignore"):
        t = np.where(d[2] < -1e-6, -o[2] / d[2], np.inf).astype(np.float32)  # the ground z = 0
    hit_id = np.full(n, -1, dtype=np.int16)  # -1: the ground (t finite) or the sky
    for k, thing in enumerate(things):
        centre, radius = _bounds(thing)
        entry, exit_ = _sphere_span(centre, radius, o, d)
        if isinstance(thing, Sphere):
            closer = (entry > _EPS) & (entry < t)
            t, hit_id = np.where(closer, entry, t), np.where(closer, k, hit_id)
            continue
        idx = np.flatnonzero(exit_ > _EPS)  # only rays through the bounding sphere meet the box
        entry, exit_ = _box_span(thing, o, tuple(x[idx] for x in d))
        closer = (exit_ >= entry) & (entry > _EPS) & (entry < t[idx])
        t[idx[closer]], hit_id[idx[closer]] = entry[closer], k

    colour = np.empty((n, 3), dtype=np.float32)
    sky = ~np.isfinite(t)
    up = np.sqrt(np.clip(d[2][sky], 0.0, 1.0))[:, None]
    colour[sky] = _SKY_HORIZON + (_SKY_ZENITH - _SKY_HORIZON) * up
    hits = np.flatnonzero(~sky)
    th, ids = t[hits], hit_id[hits]
    dh = tuple(x[hits] for x in d)
    p = tuple(o[i] + th * dh[i] for i in range(3))
    normal = [np.zeros_like(th), np.zeros_like(th), np.ones_like(th)]  # the ground's, replaced below
    albedo = np.empty((len(hits), 3), dtype=np.float32)
    ground = ids == -1
    footprint = th[ground] * sample_angle / np.maximum(np.abs(dh[2][ground]), 0.05) / scene.checker
    mix = _filtered_checker(p[0][ground] / scene.checker, p[1][ground] / scene.checker, footprint)
    light, dark = (np.asarray(c, dtype=np.float32) / 255 for c in scene.ground_colours)
    albedo[ground] = light + (dark - light) * mix[:, None]
    for k, thing in enumerate(things):
        on = np.flatnonzero(ids == k)
        if not on.size:
            continue
        pk = tuple(x[on] for x in p)
        if isinstance(thing, Sphere):
            nk = tuple((pk[i] - thing.centre[i]) / thing.radius for i in range(3))
        else:
            nk = _box_normal(thing, pk)
        for i in range(3):
            normal[i][on] = nk[i]
        albedo[on] = np.asarray(thing.colour, dtype=np.float32) / 255

    sun = scene.sun
    lambert = np.clip(normal[0] * sun[0] + normal[1] * sun[1] + normal[2] * sun[2], 0.0, 1.0)
    facing = np.flatnonzero(lambert > 0)  # only surfaces facing the sun can be in a shadow
    off_surface = tuple(p[i][facing] + 1e-3 * normal[i][facing] for i in range(3))
    lambert[facing[_shadowed(things, off_surface, sun)]] = 0.0
    shaded = albedo * (_AMBIENT + (1 - _AMBIENT) * lambert)[:, None]
    fog = (1.0 - np.exp(-th / _FOG_DISTANCE))[:, None]
    colour[hits] = shaded + (_SKY_HORIZON - shaded) * fog
    return colour


def render_camera_scene(
    scene: CameraScene,
    intrinsics: np.ndarray,
    cam_to_world: np.ndarray,
    height: int,
    width: int,
    *,
    supersample: int = 2,
) -> np.ndarray:
    """Frames ``uint8 [T, height, width, 3]`` of ``scene`` seen by cameras ``cam_to_world``
    ``[T, 4, 4]`` (OpenCV axes, centres above the ground) with ``intrinsics`` ``[3, 3]`` (pixels);
    each pixel the mean of ``supersample x supersample`` rays spread evenly over it."""
    K = np.asarray(intrinsics, dtype=np.float64)
    poses = np.asarray(cam_to_world, dtype=np.float64).reshape(-1, 4, 4)
    s = supersample
    sub = (np.arange(s) + 0.5) / s
    v = (np.arange(height)[:, None] + sub[None, :]).reshape(-1)
    u = (np.arange(width)[:, None] + sub[None, :]).reshape(-1)
    vv, uu = np.meshgrid(v, u, indexing="ij")
    pixels = np.stack([uu.reshape(-1), vv.reshape(-1), np.ones(uu.size)])  # [3, Hs * Ws]
    rays_cam = np.linalg.inv(K) @ pixels
    sample_angle = 1.0 / (s * math.sqrt(abs(K[0, 0] * K[1, 1])))  # radians per sample, near the axis
    frames = np.empty((len(poses), height, width, 3), dtype=np.float32)
    for i, pose in enumerate(poses):
        d = pose[:3, :3] @ rays_cam
        d = (d / np.linalg.norm(d, axis=0)).astype(np.float32)
        colour = _trace_frame(scene, tuple(float(c) for c in pose[:3, 3]), tuple(d), sample_angle)
        frames[i] = colour.reshape(height, s, width, s, 3).mean(axis=(1, 3))
    return np.round(np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)


def camera_intrinsics(fov_deg: float, size: int) -> np.ndarray:
    """``float64 [3, 3]``: square pixels, principal point at the centre of a ``size x size`` frame."""
    f = size / 2 / math.tan(math.radians(fov_deg) / 2)
    return np.array([[f, 0.0, size / 2], [0.0, f, size / 2], [0.0, 0.0, 1.0]])


def camera_episodes(n: int, config: CameraSceneConfig, seed: int, *, start: int = 0) -> list[CameraEpisode]:
    """Episodes ``start, ..., start + n - 1`` of ``seed``: episode ``k`` is drawn from
    ``default_rng((seed, k))`` — a random scene, field of view and camera path."""
    config.validate()
    _check_int("camera_episodes", "n", n, 0)
    episodes = []
    for k in range(start, start + n):
        rng = np.random.default_rng((seed, k))
        scene = random_camera_scene(rng)
        intrinsics = camera_intrinsics(rng.uniform(*config.fov_deg), config.size)
        path = config.paths[int(rng.integers(len(config.paths)))]
        poses, motion = camera_path(rng, path, config.frames)
        video = render_camera_scene(
            scene, intrinsics, poses, config.size, config.size, supersample=config.supersample
        )
        prompt = f"a camera {motion} {scene.describe()}"
        episodes.append(
            CameraEpisode(video, intrinsics.astype(np.float32), poses.astype(np.float32), scene, path, prompt)
        )
    return episodes


# ---------------------------------------------------------------------------------------------
# Datasets and the DataModule


class EpisodeDataset(Dataset):
    """Training samples of generated episodes (push or camera; the module docstring's contract
    without the batch dim). Keys are ``index`` or the ``(epoch, index)`` pairs of
    :class:`~cupola.collections.world.data.datamodule.EpochIndexSampler`; an episode's sample is
    the same in every epoch. ``prompt``: ``None`` for each episode's own description, or one text
    for all (``""`` to train without text)."""

    def __init__(
        self,
        episodes: list[PushEpisode] | list[CameraEpisode],
        *,
        fps: float,
        prompt: str | None = None,
        name: str = "episode",
    ) -> None:
        self.episodes, self.fps, self.prompt, self.name = episodes, float(fps), prompt, name

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index = int(key[1] if isinstance(key, tuple) else key)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} episodes")
        episode = self.episodes[index]
        video_3_T_H_W = torch.from_numpy(episode.video).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)
        return {
            "video": video_3_T_H_W.contiguous(),
            **episode.tensors(),
            "fps": self.fps,
            "prompt": episode.prompt if self.prompt is None else self.prompt,
            "id": f"{self.name}{index:06d}",
        }


def collate_episodes(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "id":
            batch["ids"] = values
        elif key == "prompt":
            batch["prompt"] = values
        elif key == "fps":
            batch["fps"] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = torch.stack(values)
    return batch


def _episode_config(owner: object, kind: str, size: int, num_frames: int, env: dict[str, Any] | None):
    cls = PushEnvConfig if kind == "push" else CameraSceneConfig
    env = dict(env or {})
    for fixed in ("size", "frames"):
        if fixed in env:
            raise config_error(owner, "env", env, f"{fixed!r} is set by the DataModule's size / num_frames")
    config = from_dict(cls, env, where=f"{type(owner).__name__}.env")
    config.size, config.frames = size, num_frames
    config.validate()
    return config


def _cache_root(cache_dir: str | Path) -> Path:
    return Path(cache_dir).expanduser() / "world_environments"


def _save_episodes(path: Path, episodes: list[PushEpisode] | list[CameraEpisode]) -> None:
    arrays: dict[str, np.ndarray] = {"video": np.stack([e.video for e in episodes])}
    if isinstance(episodes[0], PushEpisode):
        arrays["actions"] = np.stack([e.actions for e in episodes])
        arrays["states"] = np.stack([e.states for e in episodes])
        meta = [asdict(e.scene) for e in episodes]
    else:
        arrays["intrinsics"] = np.stack([e.intrinsics for e in episodes])
        arrays["cam_to_world"] = np.stack([e.cam_to_world for e in episodes])
        meta = [{"scene": asdict(e.scene), "path": e.path, "prompt": e.prompt} for e in episodes]
    arrays["meta"] = np.array(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".building_", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)  # the file appears complete or not at all; racing writers write the same
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _camera_scene_from_dict(data: dict[str, Any]) -> CameraScene:
    return CameraScene(
        checker=data["checker"],
        ground_colours=tuple(tuple(c) for c in data["ground_colours"]),
        sun=tuple(data["sun"]),
        spheres=tuple(from_dict(Sphere, s) for s in data["spheres"]),
        boxes=tuple(from_dict(Box, b) for b in data["boxes"]),
    )


def _load_episodes(path: Path, kind: str) -> list[PushEpisode] | list[CameraEpisode]:
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    if kind == "push":
        return [
            PushEpisode(video, actions, states, from_dict(PushScene, scene))
            for video, actions, states, scene in zip(
                arrays["video"], arrays["actions"], arrays["states"], meta
            )
        ]
    return [
        CameraEpisode(video, K, poses, _camera_scene_from_dict(m["scene"]), m["path"], m["prompt"])
        for video, K, poses, m in zip(arrays["video"], arrays["intrinsics"], arrays["cam_to_world"], meta)
    ]


def generate_episodes(
    kind: str,
    n: int,
    config: PushEnvConfig | CameraSceneConfig,
    seed: int,
    *,
    start: int = 0,
    cache_dir: str | Path | None = None,
) -> list[PushEpisode] | list[CameraEpisode]:
    """:func:`push_episodes` or :func:`camera_episodes`; with ``cache_dir``, read from (or written
    once to) ``cache_dir/world_environments/<kind>_<key>.npz``, the key a hash of everything that
    decides the episodes (generator version, config, seed, range)."""
    generate = push_episodes if kind == "push" else camera_episodes
    if cache_dir is None or n == 0:
        return generate(n, config, seed, start=start)
    settings = {f.name: getattr(config, f.name) for f in fields(config)}
    key = json.dumps([GENERATOR_VERSION, kind, settings, seed, start, n], sort_keys=True)
    path = _cache_root(cache_dir) / f"{kind}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        return _load_episodes(path, kind)
    episodes = generate(n, config, seed, start=start)
    _save_episodes(path, episodes)
    return episodes


class EnvironmentDataModule(ShardedLoaders):
    """Batches of generated push or camera episodes (the module docstring's contract), for
    post-training action- (``kind="push"``) or camera-conditioned (``kind="camera"``) world models.

    ``train_episodes`` episodes of ``seed`` for training, ``val_episodes`` others for validation
    (0: no validation), generated once in ``setup`` and held in memory as ``uint8``; with
    ``cache_dir`` they are written there once as ``.npz`` and read back by later runs (worth it for
    camera episodes: about 0.1 s each at 64 px). ``env``: fields of :class:`PushEnvConfig` or
    :class:`CameraSceneConfig` to change (``{"friction": 0.2}``); ``size`` and ``num_frames`` set
    theirs. ``prompt``: ``None`` gives each sample its episode's description, a string gives every
    sample that text.

    Sampling, sharding and resume: :class:`~cupola.collections.world.data.datamodule.ShardedLoaders`
    (episodes shuffled per epoch, full batches only, resumable mid-epoch). Train with
    ``Trainer(use_distributed_sampler=False)``.
    """

    collate = staticmethod(collate_episodes)

    def __init__(
        self,
        *,
        kind: str = "push",
        num_frames: int = 17,
        size: int = 64,
        micro_batch_size: int = 1,
        train_episodes: int = 256,
        val_episodes: int = 16,
        seed: int = 1234,
        num_workers: int = 0,
        prompt: str | None = None,
        env: dict[str, Any] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_choice(self, "kind", kind, ENVIRONMENT_KINDS)
        _check_int(self, "num_frames", num_frames, 2 if kind == "push" else 1)
        for name in ("size", "micro_batch_size", "train_episodes"):
            _check_int(self, name, locals()[name], 1)
        for name in ("val_episodes", "num_workers", "seed"):
            _check_int(self, name, locals()[name], 0)
        if prompt is not None and not isinstance(prompt, str):
            raise config_error(self, "prompt", prompt, "must be None (describe each episode) or a string")
        self.env_config = _episode_config(self, kind, size, num_frames, env)
        self.save_hyperparameters()
        self.kind, self.num_frames, self.size = kind, num_frames, size
        self.micro_batch_size, self.num_workers, self.seed = micro_batch_size, num_workers, seed
        self.train_episodes, self.val_episodes = train_episodes, val_episodes
        self.prompt, self.cache_dir = prompt, cache_dir
        self.fps = self.env_config.fps

    def _episodes(self, split: str) -> list[PushEpisode] | list[CameraEpisode]:
        n, start = (self.train_episodes, 0) if split == "train" else (self.val_episodes, VAL_START)
        return generate_episodes(
            self.kind, n, self.env_config, self.seed, start=start, cache_dir=self.cache_dir
        )

    def prepare_data(self) -> None:
        # Lightning calls this on local rank 0 only: cached episodes are written once per node
        if self.cache_dir is not None:
            for split in ("train", "val"):
                self._episodes(split)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            self.train_dataset = EpisodeDataset(
                self._episodes("train"), fps=self.fps, prompt=self.prompt, name=f"{self.kind}_train"
            )
        if self.val_episodes and self.val_dataset is None:
            self.val_dataset = EpisodeDataset(
                self._episodes("val"), fps=self.fps, prompt=self.prompt, name=f"{self.kind}_val"
            )
        self._check_shares(
            self.train_episodes, f"train_episodes={self.train_episodes}", "Raise train_episodes"
        )

"""Camera conditioning: per-pixel Plücker ray embeddings, intrinsics at latent resolution, poses
relative to the first frame.

Conventions (OpenCV, as in CameraCtrl and Cosmos camera conditioning):

- camera axes: x right, y down, z forward (the viewing direction);
- ``cam_to_world`` ``[..., T, 4, 4]``: columns 0-2 of the rotation are the camera's x, y, z axes in
  world coordinates, column 3 is the camera centre ``o``; ``world = R @ cam + o``;
- ``intrinsics`` ``K`` ``[3, 3]`` in pixels: ``[[fx, s, cx], [0, fy, cy], [0, 0, 1]]``, with
  continuous image coordinates in which pixel ``(u, v)`` (column, row) covers ``[u, u + 1) x
  [v, v + 1)``: its centre is ``(u + 0.5, v + 0.5)`` and the image centre of a ``W x H`` frame is
  ``(W / 2, H / 2)``.

The embedding of pixel ``(u, v)`` is ``(o x d, d)``: ``d`` the unit world-space direction of the ray
through the pixel centre, ``o x d`` its moment. Both are invariant to where along the ray ``o``
sits, and together they fix the ray — the 6 channels a camera-conditioned video model concatenates
to (or adds to) its latents, computed at the latent grid with :func:`scale_intrinsics`.
"""

from __future__ import annotations

import torch

__all__ = ["plucker_embedding", "ray_directions", "relative_to_first", "scale_intrinsics"]


def scale_intrinsics(intrinsics: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """``K`` ``[..., 3, 3]`` for frames resized by ``sx`` in width and ``sy`` in height (``1 / 8`` for a
    tokenizer's 8x spatial compression): rows 0 and 1 scale, so a point at continuous image
    coordinates ``(x, y)`` lands at ``(sx * x, sy * y)``, and the centre of low-resolution pixel
    ``(u, v)`` is the ray through the centre of the block of full-resolution pixels it covers."""
    scale = torch.tensor([sx, sy, 1.0], dtype=intrinsics.dtype, device=intrinsics.device)
    return intrinsics * scale[:, None]


def ray_directions(
    intrinsics: torch.Tensor, cam_to_world: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Unit world-space directions ``[..., T, H, W, 3]`` of the rays through the pixel centres
    (arguments as :func:`plucker_embedding`)."""
    if cam_to_world.ndim < 3 or cam_to_world.shape[-2:] != (4, 4):
        raise ValueError(f"cam_to_world must be [..., T, 4, 4]; got {list(cam_to_world.shape)}")
    if intrinsics.shape[-2:] != (3, 3):
        raise ValueError(f"intrinsics must be [3, 3] or [..., 3, 3]; got {list(intrinsics.shape)}")
    dtype = torch.promote_types(cam_to_world.dtype, torch.float32)
    device = cam_to_world.device
    K = intrinsics.to(device=device, dtype=dtype)
    K_inv = torch.linalg.inv(K if K.ndim == 2 else K[..., None, :, :])  # [..., 1, 3, 3]: shared over T
    v = torch.arange(height, device=device, dtype=dtype) + 0.5
    u = torch.arange(width, device=device, dtype=dtype) + 0.5
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    pixels_H_W_3 = torch.stack([uu, vv, torch.ones_like(uu)], dim=-1)
    # camera-space rays, then rotated to the world: d_cam = K^-1 p, d = R d_cam = (R K^-1) p
    R = cam_to_world[..., :3, :3].to(dtype)
    M = R @ K_inv  # [..., T, 3, 3]
    d = torch.einsum("...ij,hwj->...hwi", M, pixels_H_W_3)
    return d / d.norm(dim=-1, keepdim=True)


def plucker_embedding(
    intrinsics: torch.Tensor, cam_to_world: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Plücker rays ``float32 [..., T, 6, H, W]``: channels 0-2 the moment ``o x d``, 3-5 the unit
    direction ``d`` (world coordinates) of the ray through each pixel centre.

    ``intrinsics``: ``[3, 3]`` shared by every camera, or ``[..., 3, 3]`` with the leading dims of
    ``cam_to_world`` without ``T`` (one ``K`` per clip), in pixels of a ``height x width`` frame
    (use :func:`scale_intrinsics` for a latent grid). ``cam_to_world``: ``[..., T, 4, 4]``, OpenCV
    axes (module docstring). Pass poses from :func:`relative_to_first` to condition on camera
    motion independently of the world frame.
    """
    d = ray_directions(intrinsics, cam_to_world, height, width)  # [..., T, H, W, 3]
    o = cam_to_world[..., None, None, :3, 3].to(d.dtype).expand_as(d)
    moment = torch.linalg.cross(o, d, dim=-1)
    rays = torch.cat([moment, d], dim=-1)  # [..., T, H, W, 6]
    return rays.movedim(-1, -3).to(torch.float32).contiguous()


def relative_to_first(cam_to_world: torch.Tensor) -> torch.Tensor:
    """Poses ``[..., T, 4, 4]`` in the first camera's frame: ``inverse(c2w[..., 0]) @ c2w``; frame 0
    becomes the identity. The result is the same wherever the world frame is put (any rigid motion
    applied to all of a clip's poses cancels)."""
    R0 = cam_to_world[..., :1, :3, :3]
    o0 = cam_to_world[..., :1, :3, 3:]
    R0_T = R0.transpose(-1, -2)
    out = cam_to_world.clone()
    out[..., :3, :3] = R0_T @ cam_to_world[..., :3, :3]
    out[..., :3, 3:] = R0_T @ (cam_to_world[..., :3, 3:] - o0)
    out[..., 3, :] = torch.tensor([0, 0, 0, 1], dtype=out.dtype, device=out.device)
    return out

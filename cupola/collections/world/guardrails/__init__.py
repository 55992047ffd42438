"""Guardrails around world-model generation: a prompt blocklist before, face blurring after.

    guard = Guardrails()                       # both on, default settings
    guard.check_prompt(prompt)                 # raises PromptRefused, naming the matched term(s)
    video, report = guard.postprocess(video)   # uint8 [T, H, W, C]; faces blurred; counts in report

``Guardrails.disabled()`` turns both off (the generate command's opt-out).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cupola.collections.world.guardrails.faces import FaceBlurConfig, FaceBox, blur_faces, detect_faces
from cupola.collections.world.guardrails.prompt import (
    DEFAULT_BLOCKLIST,
    PromptGuard,
    PromptGuardConfig,
    PromptMatch,
    PromptRefused,
    PromptVerdict,
)

__all__ = [
    "DEFAULT_BLOCKLIST",
    "FaceBlurConfig",
    "FaceBox",
    "Guardrails",
    "PromptGuard",
    "PromptGuardConfig",
    "PromptMatch",
    "PromptRefused",
    "PromptVerdict",
    "blur_faces",
    "detect_faces",
]


class Guardrails:
    """The prompt check and the face blur that ``cupola world generate`` runs around generation."""

    def __init__(self, prompt: PromptGuardConfig | None = None, faces: FaceBlurConfig | None = None) -> None:
        self.prompt_guard = PromptGuard(prompt or PromptGuardConfig())
        self.faces = faces or FaceBlurConfig()
        self.faces.validate()

    @classmethod
    def disabled(cls) -> Guardrails:
        return cls(PromptGuardConfig(enabled=False), FaceBlurConfig(enabled=False))

    def check_prompt(self, prompt: str) -> PromptVerdict:
        """The verdict for an allowed prompt; raises :class:`PromptRefused` otherwise."""
        return self.prompt_guard.enforce(prompt)

    def postprocess(
        self, video_T_H_W_C: np.ndarray | torch.Tensor
    ) -> tuple[np.ndarray | torch.Tensor, dict[str, Any]]:
        """Blur faces in a uint8 ``[T, H, W, C]`` video; returns it with a JSON-ready report."""
        video, boxes = blur_faces(video_T_H_W_C, self.faces)
        report = {
            "face_blur": self.faces.enabled,
            "frames": len(boxes),
            "frames_with_faces": sum(
                any(b.source_frame == t for b in frame) for t, frame in enumerate(boxes)
            ),
            "frames_blurred": sum(bool(frame) for frame in boxes),
            "faces_detected": sum(b.source_frame == t for t, frame in enumerate(boxes) for b in frame),
            "boxes_blurred": sum(len(frame) for frame in boxes),
            "boxes": [[[b.x0, b.y0, b.x1, b.y1] for b in frame] for frame in boxes],
        }
        return video, report

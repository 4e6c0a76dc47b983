"""Size limits for what crosses the wire: one definition, used by server validation, client checks
and the docs. Oversize input is rejected with a message naming the limit, never a crash."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 32 * MiB  # gRPC receive limit per message
    max_image_bytes: int = 8 * MiB  # encoded bytes of one image (1024x1024 RGB8 is 3 MiB)
    max_image_side: int = 2048  # pixels, height and width, checked before decoding pixels
    max_instruction_chars: int = 1000
    max_images: int = 8
    max_state_dim: int = 256
    # Images the model's image processor can take: Qwen2-VL's resize needs an aspect ratio below 200
    # and a side it can scale to its 28 px patch grid, and an HxWx3 array with a side of 3 or less is
    # ambiguous about its channel axis. Smaller or thinner images are refused from the header.
    min_image_side: int = 8  # pixels, height and width
    max_image_aspect: int = 50  # longer side / shorter side
    # Every state value in robot units (radians, metres, gripper 0..1): finite but absurd values
    # (1e10, 1e38) overflow normalisation and give NaN actions, so they are refused by validation.
    max_state_abs: float = 1e4
    # Tighter, per index (server validation, chatvla.server.validation.StateBounds): a state outside the
    # robot profile's limits widened by this share of each range (joint profiles), or more than
    # `max_state_sigma` standard deviations of the checkpoint's state statistics from their mean, is a
    # wrong unit (degrees for radians), a sensor fault or hostile, never a robot the model can serve.
    state_margin: float = 0.1
    max_state_sigma: float = 50.0

    def to_proto_fields(self) -> dict[str, int]:
        return {
            "max_message_bytes": self.max_message_bytes,
            "max_image_bytes": self.max_image_bytes,
            "max_image_side": self.max_image_side,
            "max_instruction_chars": self.max_instruction_chars,
            "max_images": self.max_images,
        }


DEFAULT_LIMITS = Limits()

"""chatvla-serve: a ChatVLA-2 style vision-language-action model behind a network API.

Importing `chatvla` (or `chatvla.client`, `chatvla.profiles`, `chatvla.v1`, `chatvla.wire`) must never
import torch: robot PCs install only the core distribution. Server code lives in `chatvla.model`,
`chatvla.engines` and `chatvla.server`.
"""

__version__ = "0.1.0"

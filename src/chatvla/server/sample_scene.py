"""A rendered sample scene for the debug page: one PNG per profile camera, from the MuJoCo sim.

Someone opening the debug page on a fresh server rarely has a camera frame of the right robot at hand;
with the `sim` extra installed the server can render one (the math-matching table of task seed 0,
training split, seen by every camera of the profile, arm at its start pose).

Rendering runs in a child process (`python -m chatvla.server.sample_scene PROFILE`), once per server
lifetime, on first request: the server process never imports MuJoCo or opens a GL context (a fault in a
software rasteriser, seen once in `chatvla eval`, must not take down a server that drives robots), and
a server that never shows the page never pays for it. The answer (images, or why there are none) is
cached; only a timeout or a crash of the child, which may be transient, is tried again on the next
request.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import sys
from dataclasses import dataclass, field

import msgpack

SAMPLE_TASK = "math_matching"
SAMPLE_SEED = 0
RENDER_TIMEOUT_S = 120.0
_MAX_CHILD_OUTPUT = 32 << 20  # a few PNGs; far more means something else is talking on stdout


class SampleUnavailable(Exception):
    """No sample can be rendered here; the message says why (shown to the user as is, so bounded)."""


@dataclass
class SampleScenes:
    """The cached sample of one profile. `probe()` is cheap (no rendering); `png()` renders on first use."""

    profile: str
    timeout_s: float = RENDER_TIMEOUT_S
    _images: dict[str, bytes] | None = field(default=None, init=False, repr=False)
    _error: str | None = field(default=None, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    def probe(self) -> tuple[bool, str]:
        """(available, reason), without rendering: is MuJoCo installed and is there a sim of this profile?
        Whether this machine can render headless is only known after the first render."""
        if self._error is not None:
            return False, self._error
        if self._images is not None:
            return True, "rendered"
        if importlib.util.find_spec("mujoco") is None:
            return False, "the simulator is not installed on the server (pip install 'chatvla-serve[sim]')"
        try:
            from chatvla.client.sim.rigs import RIGS
        except Exception as e:  # a broken install says so on the page instead of failing the request
            return False, f"the simulator does not import on the server ({type(e).__name__})"
        if self.profile not in RIGS:
            return False, f"no simulated scene for profile {self.profile} (have: {', '.join(sorted(RIGS))})"
        return True, "not rendered yet"

    async def png(self, camera: str) -> bytes:
        """The sample PNG of `camera` (a camera of the profile), rendering all cameras on first use."""
        images = await self._all()
        if camera not in images:
            raise SampleUnavailable(f"the sample scene has no camera {camera[:64]!r}")
        return images[camera]

    async def _all(self) -> dict[str, bytes]:
        async with self._lock:
            if self._images is not None:
                return self._images
            if self._error is None:
                ok, reason = self.probe()
                if not ok:
                    self._error = reason
            if self._error is not None:
                raise SampleUnavailable(self._error)
            images, error, final = await self._render()
            if images is not None:
                self._images = images
                return images
            if final:
                self._error = error
            raise SampleUnavailable(error)

    async def _render(self) -> tuple[dict[str, bytes] | None, str, bool]:
        """(images, error, whether the error is final) from one run of the child."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chatvla.server.sample_scene", self.profile,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            out = await asyncio.wait_for(proc.stdout.read(_MAX_CHILD_OUTPUT + 1), self.timeout_s)  # type: ignore[union-attr]
            await asyncio.wait_for(proc.wait(), self.timeout_s)
        except asyncio.TimeoutError:
            return None, f"rendering the sample scene took longer than {self.timeout_s:.0f} s", False
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        try:
            doc = msgpack.unpackb(out, raw=False) if len(out) <= _MAX_CHILD_OUTPUT else None
        except (ValueError, msgpack.UnpackException):
            doc = None
        if not isinstance(doc, dict):
            return None, f"the renderer exited with code {proc.returncode} and no answer", False
        if isinstance(doc.get("error"), str):
            return None, doc["error"][:400], True
        images = doc.get("images")
        if not isinstance(images, dict) or not all(isinstance(v, bytes) for v in images.values()):
            return None, "the renderer answered without images", False
        return {str(k): v for k, v in images.items()}, "", True


def render_sample(profile: str) -> dict[str, bytes]:
    """camera -> PNG bytes of the sample scene (runs in the child; needs the sim extra and headless GL).
    Raises SampleUnavailable with the reason."""
    try:
        import chatvla.client.sim  # noqa: F401 - picks the headless GL backend before MuJoCo loads
        from chatvla.client.sim.render import rendering_available
    except ImportError as e:
        raise SampleUnavailable(f"the simulator does not import on the server ({e})") from None
    ok, detail = rendering_available()
    if not ok:
        raise SampleUnavailable(f"MuJoCo cannot render headless on the server (needs EGL or OSMesa): {detail[:200]}")
    from PIL import Image

    from chatvla.client.sim import make_sim_robot, make_task
    from chatvla.client.sim.rigs import RIGS

    if profile not in RIGS:
        raise SampleUnavailable(f"no simulated scene for profile {profile}")
    robot = make_sim_robot(profile, make_task(SAMPLE_TASK, seed=SAMPLE_SEED, split="train"))
    try:
        frames = robot.observe().images
    finally:
        robot.close()
    out = {}
    for name, pixels in frames.items():
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out[name] = buf.getvalue()
    return out


def main(argv: list[str] | None = None) -> int:
    """Child entry point: writes one msgpack map to stdout, `{"images": {camera: png}}` or `{"error": why}`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m chatvla.server.sample_scene PROFILE", file=sys.stderr)
        return 2
    try:
        doc: dict = {"images": render_sample(args[0])}
    except SampleUnavailable as e:
        doc = {"error": str(e)}
    except Exception as e:  # a sim that fails to build: the server shows the reason, not a traceback
        doc = {"error": f"rendering the sample scene failed: {type(e).__name__}: {str(e)[:200]}"}
    sys.stdout.buffer.write(msgpack.packb(doc, use_bin_type=True))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run by tests/server/openpi/test_openpi_client.py with the isolated `.venv-openpi` interpreter (openpi-client
0.1.2 from PyPI, numpy<2): drives our endpoint with the real client and prints one JSON line.

    python drive_openpi_client.py URL STYLE [API_KEY]   STYLE: aloha | aloha-no-prompt | droid | connect-only
"""

import json
import sys

import numpy as np
from openpi_client import action_chunk_broker, msgpack_numpy, websocket_client_policy


def observation(style: str) -> dict:
    rng = np.random.default_rng(0)
    if style == "droid":
        return {
            "observation/exterior_image_1_left": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
            "observation/wrist_image_left": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
            "observation/joint_position": np.linspace(-0.3, 0.3, 7),
            "observation/gripper_position": np.array([0.04]),
            "prompt": "put the marker in the cup",
        }
    # openpi's ALOHA client: four cameras as 3x224x224 uint8, a 14-d state, a prompt
    images = {c: rng.integers(0, 255, (3, 224, 224), dtype=np.uint8)
              for c in ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")}
    obs = {"state": np.zeros(14, np.float32), "images": images}
    if style == "aloha":  # openpi's ALOHA environments send no prompt at all ("aloha-no-prompt")
        obs["prompt"] = "stack the cups"
    return obs


def main() -> None:
    url, style = sys.argv[1], sys.argv[2]
    key = sys.argv[3] if len(sys.argv) > 3 else None
    out: dict = {}
    try:
        policy = websocket_client_policy.WebsocketClientPolicy(url, api_key=key)
    except Exception as e:  # e.g. websockets InvalidStatus 401
        out["connect_error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(out))
        return
    out["metadata"] = policy.get_server_metadata()
    if style != "connect-only":
        obs = observation(style)
        reply = policy.infer(obs)
        a = reply["actions"]
        out.update(keys=sorted(reply), shape=list(a.shape), dtype=str(a.dtype), finite=bool(np.isfinite(a).all()),
                   reasoning=reply.get("reasoning"), server_timing=reply["server_timing"],
                   policy_timing=reply["policy_timing"], actions=a.tolist())
        if style == "aloha-no-prompt":
            print(json.dumps(out, default=str))
            return
        second = policy.infer(obs)
        out["second_has_prev_total"] = "prev_total_ms" in second["server_timing"]
        # openpi's runtime path: the chunk broker slices one action per step and calls infer again after
        # `action_horizon` steps
        horizon = int(out["metadata"]["action_horizon"])
        broker = action_chunk_broker.ActionChunkBroker(policy, action_horizon=horizon)
        steps = [broker.infer(obs)["actions"] for _ in range(horizon + 2)]
        out["broker_step_shape"] = list(steps[0].shape)
        out["broker_steps"] = len(steps)
        # our reply decodes with openpi's own codec
        out["codec_ok"] = bool(np.array_equal(msgpack_numpy.unpackb(msgpack_numpy.packb({"a": a}))["a"], a))
        try:
            policy.infer({"prompt": "no images here"})
            out["error"] = None
        except RuntimeError as e:
            out["error"] = str(e)
        # the error answered that frame only: the same connection serves the next observation
        out["after_error_shape"] = list(policy.infer(obs)["actions"].shape)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()

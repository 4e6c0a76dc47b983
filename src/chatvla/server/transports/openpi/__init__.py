"""An openpi-compatible websocket endpoint, so robot stacks built on `openpi-client` can use this server
unchanged (`WebsocketClientPolicy(host, port, api_key)`).

The protocol is openpi's (docs/openpi.md has the full description):

* one websocket per robot, any path; `GET /healthz` without an upgrade answers `200 OK\\n`;
* the server speaks first: one binary frame with the msgpack metadata map;
* then strict alternation: the client sends one binary msgpack observation, the server answers one
  binary msgpack map `{"actions": ndarray[H, D] float32, "policy_timing": {...}, "server_timing": {...}}`,
  plus the reasoning text under `"reasoning"`;
* numpy arrays travel as maps with *bytes* keys `__ndarray__`, `data`, `dtype`, `shape` (numpy scalars
  as `__npgeneric__`, `data`, `dtype`); object, void and complex dtypes are refused;
* an error answers its frame with one *text* frame `CODE: [field: ]message` (openpi-client raises it as
  RuntimeError) and the connection keeps serving; only protocol breakage closes it (more than
  MAX_TEXT_FRAMES text frames in a row: 1003; an oversize frame: 1009; a server bug: 1011);
* when tokens are configured, the upgrade needs `Authorization: Api-Key <token>` (401 otherwise).

openpi observations are dicts whose keys depend on the policy config (DROID: `observation/...`,
ALOHA: `state`, `images/cam_high`, ...). An `OpenpiMapping` says which key holds which of our cameras
and which keys, concatenated, make our state vector, which prompt applies when none is sent, and what
the reply's `actions` hold (our chunk, or DROID's joint velocities + gripper closedness); presets cover
DROID-style Franka and ALOHA-style bimanual clients, and a YAML file (`--openpi-mapping FILE`) covers
anything else.

The package has one module per job: `codec` (openpi's msgpack-numpy encoding), `mappings` (openpi
keys -> our cameras and state) and `endpoint` (the websocket server and its sessions).

Each connection is one pipeline session (transport label `openpi_ws`), so it gets the dual-rate
reasoning cache and the fairness of a gRPC Stream. Everything that crosses the wire is validated and
decoded in the preprocessing pool, never on the event loop, and nothing is ever unpickled: arrays are
built from an allow-listed dtype, a shape and bytes.
"""

from chatvla.server.transports.openpi.codec import decode_ndarray, pack_message, unpack_message
from chatvla.server.transports.openpi.endpoint import (
    ERROR_CLOSE_REASON,
    MAX_TEXT_FRAMES,
    REASONING_KEY,
    TRANSPORT,
    OpenpiEndpoint,
    OpenpiServer,
    observation_from_openpi,
    start_openpi,
)
from chatvla.server.transports.openpi.mappings import (
    DEFAULT_PROMPTS,
    PRESETS,
    ActionOutput,
    ImageKey,
    MappingError,
    OpenpiMapping,
    StateKey,
    apply_mapping,
    default_preset,
    load_mapping,
    mapping_from_dict,
    preset,
)

__all__ = [
    "DEFAULT_PROMPTS",
    "ERROR_CLOSE_REASON",
    "MAX_TEXT_FRAMES",
    "PRESETS",
    "REASONING_KEY",
    "TRANSPORT",
    "ActionOutput",
    "ImageKey",
    "MappingError",
    "OpenpiEndpoint",
    "OpenpiMapping",
    "OpenpiServer",
    "StateKey",
    "apply_mapping",
    "decode_ndarray",
    "default_preset",
    "load_mapping",
    "mapping_from_dict",
    "observation_from_openpi",
    "pack_message",
    "preset",
    "start_openpi",
    "unpack_message",
]

"""Load testing from recorded observations: N virtual robots replay episodes through the real client
path (GrpcPolicyClient + the ChunkExecutor's request policy) against one server. Torch-free.

`chatvla loadtest` is the command line; `run_loadtest(LoadTestConfig(...))` the API. See
docs/operations.md for reading the report and sizing a server from it.
"""

from chatvla.client.loadtest.runner import (
    LoadTestConfig,
    LoadTestError,
    run_loadtest,
    summary_lines,
    write_reports,
)
from chatvla.client.loadtest.sources import ReplayEpisode, SourceError, load_recordings, synthetic_episodes
from chatvla.client.loadtest.targets import TargetError, check_target

__all__ = [
    "LoadTestConfig",
    "LoadTestError",
    "ReplayEpisode",
    "SourceError",
    "TargetError",
    "check_target",
    "load_recordings",
    "run_loadtest",
    "summary_lines",
    "synthetic_episodes",
    "write_reports",
]

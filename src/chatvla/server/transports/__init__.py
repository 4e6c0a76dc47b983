"""Network front-ends of the scheduler: gRPC (the robot API), HTTP (debug page, probes, metrics) and
the openpi-compatible websocket (`openpi/`). Each decodes and validates through `server/validation.py`
and hands observations to `server/scheduler.py`."""

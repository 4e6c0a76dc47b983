"""Network front-ends of the pipeline: gRPC (the robot API) and HTTP (debug, probes, metrics)."""

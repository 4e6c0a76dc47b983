"""Generated protobuf/gRPC stubs of proto/chatvla/v1/policy.proto (regenerate with scripts/gen_proto.sh)."""

"""Open Inference Protocol v2 gRPC messages and service stubs, generated from
``grpc_predict_v2.proto`` by ``python -m espro_client._proto.generate`` (do not edit them)."""

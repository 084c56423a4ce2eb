"""moed.v1: messages (moed_pb2) and service stubs (moed_pb2_grpc), generated from moed.proto."""

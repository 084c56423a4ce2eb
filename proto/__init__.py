"""gRPC protocol of the daemon (moed.v1) and its generated modules."""

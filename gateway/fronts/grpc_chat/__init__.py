"""The typed gRPC chat API (``mmserve.chat.v1``): the servicer and its protobuf mapping."""

"""The gRPC router: request placement policies, the prefix cache index, streaming results back."""

"""The gRPC transport: servicer, interceptor and server assembly. Domain logic lives outside."""

"""The Greeter gRPC service: server, client commands and load tool."""

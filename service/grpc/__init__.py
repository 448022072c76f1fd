"""The Open Inference Protocol's gRPC API (``inference.GRPCInferenceService``): a second
transport over the same protocol core (service.protocol) as the HTTP front."""

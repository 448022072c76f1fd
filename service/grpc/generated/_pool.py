"""The descriptor pool of the generated modules (see service.grpc.codegen for why not the
default one)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()

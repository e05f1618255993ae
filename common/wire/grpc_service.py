"""The generated gRPC glue of one service, imported when first used (the `_pb2_grpc`
modules need grpcio, which not every importer of a wire module does)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GrpcService:
    """`module` is the generated `*_pb2_grpc` module; `name` the service (e.g. "SplitTrainer")."""

    module: str
    name: str

    def _generated(self) -> Any:
        return importlib.import_module(self.module)

    def stub(self, channel: Any) -> Any:
        """A client stub on a gRPC channel."""
        return getattr(self._generated(), f"{self.name}Stub")(channel)

    def add_servicer(self, servicer: Any, server: Any) -> None:
        """Register an implementation on a gRPC server."""
        getattr(self._generated(), f"add_{self.name}Servicer_to_server")(servicer, server)

    def servicer_base(self) -> type:
        """The generated servicer base class to subclass."""
        return getattr(self._generated(), f"{self.name}Servicer")

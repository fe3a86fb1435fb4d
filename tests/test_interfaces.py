"""The executor interface is a typed Protocol, and both executors and both server kinds implement
every method of it with the same parameters (read from their signatures, nothing is run)."""
import inspect

import pytest

from meerkat_ray.distributed.executor import RayExecutor
from meerkat_ray.distributed.server_proxy import ServerProxy
from meerkat_ray.executors import Executor, ServerHandle
from meerkat_ray.local_executor import LocalExecutor
from meerkat_ray.server import Server


def protocol_methods(protocol) -> dict[str, list[str]]:
    return {name: list(inspect.signature(fn).parameters)
            for name, fn in vars(protocol).items() if inspect.isfunction(fn) and not name.startswith("_")}


@pytest.mark.parametrize("protocol,impl", [(Executor, LocalExecutor), (Executor, RayExecutor),
                                           (ServerHandle, Server), (ServerHandle, ServerProxy)],
                         ids=["local", "ray", "server", "server-proxy"])
def test_implementations_have_every_method_with_its_parameters(protocol, impl):
    methods = protocol_methods(protocol)
    assert methods  # the protocol names its methods
    for name, params in methods.items():
        fn = getattr(impl, name, None)
        assert callable(fn), f"{impl.__name__} lacks {name}"
        assert list(inspect.signature(fn).parameters)[: len(params)] == params, (impl.__name__, name)


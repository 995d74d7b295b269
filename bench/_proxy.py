"""The client transport's stand-in of the probed gateways (bench/answer_cost.py --bytecodes,
bench/ttft_phases.py): source text run in that gateway's process, before the code that uses it.

`Proxy(transport, first)` passes every call on to `transport` and calls `first()` at the
first write to it: the moment the client's first bytes go out. `PROXY_CODES` holds the code
objects of the stand-in's own functions, for a tracer to skip.
"""

FIRST_WRITE_PROXY = r"""
import asyncio
class Proxy(asyncio.Transport):
    def __init__(self, transport, first):
        self._transport, self._first = transport, first
    def write(self, data):
        first = self._first
        if first is not None:
            self._first = None
            first()
        self._transport.write(data)
    def writelines(self, data):
        self.write(b"".join(data))
    def __getattr__(self, name):
        return getattr(self._transport, name)
def _forward(name):
    def call(self, *args, **kwargs):
        return getattr(self._transport, name)(*args, **kwargs)
    return call
PROXY_CODES = {Proxy.__init__.__code__, Proxy.write.__code__, Proxy.writelines.__code__,
               Proxy.__getattr__.__code__}
for _name in ("is_closing", "close", "abort", "get_extra_info", "pause_reading",
              "resume_reading", "is_reading", "set_write_buffer_limits",
              "get_write_buffer_size", "can_write_eof", "write_eof", "set_protocol",
              "get_protocol"):
    setattr(Proxy, _name, _forward(_name))
    PROXY_CODES.add(getattr(Proxy, _name).__code__)
"""

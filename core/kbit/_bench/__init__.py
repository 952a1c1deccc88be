"""``kbit bench``: timing kbit's ops on every backend next to the incumbent and torch.

- ``cases``: what is timed (op variants, inputs, bytes moved, one runner per library);
- ``timing``: warm-up/repeat timing, memcpy bandwidth, peak extra memory;
- ``worker``: the measuring process, also run by an interpreter without kbit;
- ``runner``: starts the workers and orders the measurements;
- ``targets``: the CPU backend's performance targets, checked against a run.

``cases``, ``timing`` and ``worker`` import only torch at load time.
"""

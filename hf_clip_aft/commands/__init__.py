"""The `hf-clip-aft` commands, one module each: ``ARGUMENTS`` (dataclasses) and ``main(*args)`` calling the library.

`hf_clip_aft.cli.COMMANDS` names them; ``recipes/<command>.py`` and ``hf-clip-aft <command>`` run them.
"""

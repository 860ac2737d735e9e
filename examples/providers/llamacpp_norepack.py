"""``python -m llama_cpp.server`` with weight repacking turned off.

    python examples/providers/llamacpp_norepack.py --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --logits_all true --host 127.0.0.1 --port 8080

Run it with the Python that has ``llama-cpp-python[server]`` installed; it takes the server's own
flags. Why: llama-cpp-python 0.3.36 repacks quantised weights for the CPU's extra kernels (AMX on
recent Xeons: "amx repack tensor ..." in its log) and, on such a machine, dies with a segfault in
``llama_decode`` on the first completion, chat or embeddings request (the client sees the
connection dropped). Its ``Llama`` has no switch for this, so the model defaults are patched
(``use_extra_bufts = False``, llama.cpp's ``--no-repack``) before the server starts.
"""

import sys

import llama_cpp.llama_cpp as lc

_defaults = lc.llama_model_default_params


def _no_repack():  # type: ignore[no-untyped-def]
    params = _defaults()
    params.use_extra_bufts = False
    return params


lc.llama_model_default_params = _no_repack

from llama_cpp.server.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

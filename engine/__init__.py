"""moedesk's engine: everything that runs a model. Never imports Qt."""
import os

# Offline always: nothing in the engine may reach a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# 2 MiB pages: torch's CPU allocator asks Linux for transparent huge pages for tensors of 2 MiB and more
# when this is set before torch is imported (c10 reads it once). On the 2-vCPU EPYC a read-only stream ran
# 42 → 51 GB/s and a 241-token int4 prefill 851 → 730 ms (its multi-MiB buffers fault 2 MiB at a time);
# decoding moved within noise (docs/cpu_decode.md, "Huge pages"). Elsewhere (no THP, not Linux) it changes
# nothing; THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

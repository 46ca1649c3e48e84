from torchrec_hytrec.ops.tadn.chunk import chunk_tadn
from torchrec_hytrec.ops.tadn.naive import naive_recurrent_tadn, tadn_step

__all__ = ["chunk_tadn", "naive_recurrent_tadn", "tadn_step"]

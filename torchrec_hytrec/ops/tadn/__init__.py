from torchrec_hytrec.ops.tadn.naive import naive_recurrent_tadn, tadn_step

__all__ = ["naive_recurrent_tadn", "tadn_step"]

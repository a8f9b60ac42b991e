"""Readable pytest ids for the CUDA test cases (bits, K, N, group_size, act_order, zero_offset, scale dtype)."""


def gptq_case_id(c) -> str:
    bits, K, N, gs, act, off, sdt = c
    return f"b{bits}-K{K}-N{N}-g{gs}-{'act' if act else 'seq'}-v{2 - off}-s{str(sdt)[6:]}"

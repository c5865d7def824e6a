"""NCCL all-reduce bandwidth between the GPUs of one host, to tell a slow link from a slow step.

One process per GPU. bf16 tensors of a few sizes (the largest about a 380M-parameter model's
gradients) are all-reduced after a warm-up; printed: the mean time and the bus bandwidth in NCCL's
convention, 2 x (n - 1) / n x size / time. Run with `NCCL_DEBUG=INFO` to see the transport NCCL chose
(P2P over NVLink, or SHM/PCIe).

    torchrun --nproc-per-node 2 bench/allreduce_bandwidth.py
"""

import time

import torch
import torch.distributed as dist

SIZES_MIB = (64, 256, 760)


def main() -> None:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    for mib in SIZES_MIB:
        x = torch.ones(mib * 2**20 // 2, dtype=torch.bfloat16, device="cuda")
        for _ in range(3):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / 10
        busbw = 2 * (world - 1) / world * (mib / 1024) / seconds
        if rank == 0:
            print(f"all_reduce {mib} MiB: {seconds * 1e3:.2f} ms, busbw {busbw:.1f} GiB/s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

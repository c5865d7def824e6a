import os, time, torch, torch.distributed as dist
dist.init_process_group("nccl")
r = dist.get_rank(); torch.cuda.set_device(r)
for mb in (64, 256, 760):
    x = torch.ones(mb * 2**20 // 2, dtype=torch.bfloat16, device="cuda")
    for _ in range(3): dist.all_reduce(x)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10): dist.all_reduce(x)
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
    if r == 0: print(f"all_reduce {mb} MiB: {dt*1e3:.2f} ms, busbw {2*(mb/1024)/dt:.1f} GiB/s", flush=True)
dist.destroy_process_group()

"""What an offline W&B segment holds, read from its run-<id>.wandb record file (wandb 0.31 keeps no Python reader):

  python docs/read_wandb.py "runs/digits/wandb/offline-run-*/run-*.wandb"

prints, per file, the run id, whether it calls itself resumed, its start time, the history steps it logged and
its record counts. Used for the README's statement on offline segments (docs/slurm.md, W&B without network).
"""
import glob
import struct
import sys

from wandb.proto import wandb_internal_pb2 as pb


def records(path):
    """The file's serialized records: a 7-byte ":W&B" header, then LevelDB-log framing (32 KiB blocks; each
    fragment: CRC-32C, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left; continue
        crc, length, typ = struct.unpack("<IHB", data[pos:pos + 7])
        if typ == 0 and length == 0:
            pos += left; continue
        chunk = data[pos + 7:pos + 7 + length]; pos += 7 + length
        if typ == 1: yield chunk
        elif typ == 2: buf = chunk
        elif typ == 3: buf += chunk
        elif typ == 4: yield buf + chunk


def main(pattern: str) -> None:
    for f in sorted(glob.glob(pattern)):
        kinds, steps, run = {}, [], None
        for raw in records(f):
            r = pb.Record(); r.ParseFromString(raw)
            k = r.WhichOneof("record_type"); kinds[k] = kinds.get(k, 0) + 1
            if k == "run": run = r.run
            if k == "history":
                steps.append(r.history.step.num if r.history.HasField("step") else None)
        print(f)
        print("  run_id", run.run_id, "| resumed", run.resumed, "| start_time", run.start_time.seconds,
              "| starting_step", run.starting_step, "| project", run.project)
        print("  history steps", steps)
        print("  records", kinds)


if __name__ == "__main__":
    main(sys.argv[1])

"""Small video files with the traits real ones have (each frame's index in its pixels, an edit list that drops
the first samples, a display rotation), for the tests of the readers."""
import av
import numpy as np


def distinct_frames(t, h=32, w=48):
    """Frames whose value says their index (after H.264: within a few levels), so a wrong pick shows."""
    return (np.arange(t)[:, None, None, None] * 2 * np.ones((1, h, w, 3))).astype(np.uint8)


def remux_shifted(source, target, frames_back: int, fps: int):
    """``source`` remuxed with every timestamp moved back ``frames_back`` frames: an mp4 whose edit list drops its
    first samples, as a trim without re-encoding (ffmpeg -ss ... -c copy) leaves it. Its header still lists them."""
    with av.open(str(source)) as src, av.open(str(target), "w") as out:
        stream = src.streams.video[0]
        copy = out.add_stream_from_template(stream)
        shift = frames_back * int(round(1 / (fps * stream.time_base)))
        for packet in src.demux(stream):
            if packet.dts is None:
                continue
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = copy
            out.mux(packet)
    return target


def rotated(path, target):
    """``path`` with its track header's display matrix set to a quarter turn (a phone's portrait clip)."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    version = data[at + 4]
    matrix = at + 8 + (32 if version == 1 else 20) + 8 + 8  # flags, times/ids/duration, reserved, layer..volume
    data[matrix:matrix + 36] = struct.pack(">9i", 0, 65536, 0, -65536, 0, 0, 0, 0, 0x40000000)
    target.write_bytes(bytes(data))
    return target


def cut_short(source, target, share: float = 0.9):
    """``source`` remuxed with its index first (faststart, as web videos and many phones write mp4) and cut to
    ``share`` of its bytes: an unfinished download or recording. Its index lists every frame; the last ones' data
    is missing or partial, so the packets that are read count a few frames more than decode."""
    with av.open(str(source)) as src, av.open(str(target), "w", options={"movflags": "faststart"}) as out:
        copy = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = copy
                out.mux(packet)
    data = target.read_bytes()
    target.write_bytes(data[:int(len(data) * share)])
    return target


def decodable(path) -> np.ndarray:
    """Every frame the decode from the start gives before it stops (at the end, or at data it cannot decode)."""
    frames = []
    with av.open(str(path)) as container:
        try:
            for frame in container.decode(container.streams.video[0]):
                frames.append(frame.to_ndarray(format="rgb24"))
        except av.error.FFmpegError:
            pass
    return np.stack(frames)

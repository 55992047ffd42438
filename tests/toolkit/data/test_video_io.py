import av
import decord
import numpy as np
import pytest
import torch
from PIL import Image

from cupola.toolkit.data.video import (
    MediaError,
    image_info,
    read_frames,
    read_image,
    sample_indices,
    to_pixels,
    video_info,
    write_video,
)

STEP = 6  # frame i is a flat colour with red = STEP * i: survives the codec within a few levels


def counting_clip(n: int, size: tuple[int, int] = (32, 64)) -> np.ndarray:
    frames = np.empty((n, *size, 3), dtype=np.uint8)
    for i in range(n):
        frames[i] = (STEP * i, 255 - STEP * i, 128)
    return frames


def frame_numbers(frames: np.ndarray) -> list[int]:
    """The index each decoded frame of a counting clip encodes."""
    return [round(float(f[..., 0].mean()) / STEP) for f in frames]


@pytest.fixture(scope="module")
def clip40(tmp_path_factory):
    """40 frames at 8 fps (5 s): frame i encodes i."""
    return write_video(tmp_path_factory.mktemp("video") / "nested" / "count.mp4", counting_clip(40), fps=8)


def test_uniform_sampling_takes_the_centre_frame_of_equal_segments(clip40):
    # 40 frames in 5 segments of 8: centres floor((2j + 1) * 40 / 10) = 4, 12, 20, 28, 36
    assert sample_indices(40, 8.0, num_frames=5).tolist() == [4, 12, 20, 28, 36]
    assert frame_numbers(read_frames(clip40, num_frames=5)) == [4, 12, 20, 28, 36]
    assert frame_numbers(read_frames(clip40, num_frames=1)) == [20]
    # more frames than the video has: frames repeat, the count is kept (token counts stay fixed)
    assert sample_indices(3, 8.0, num_frames=6).tolist() == [0, 0, 1, 1, 2, 2]


def test_fps_sampling_and_its_cap(clip40):
    # 8 fps video at 2 fps: every 4th frame from the start
    assert frame_numbers(read_frames(clip40, fps=2)) == list(range(0, 40, 4))
    # capped at 4 of those 10: the centre rule over the list picks its items 1, 3, 6, 8
    assert frame_numbers(read_frames(clip40, fps=2, max_frames=4)) == [4, 12, 24, 32]
    # a non-integer step floors each time: k * 8 / 3
    assert sample_indices(40, 8.0, fps=3).tolist() == [int(k * 8 / 3) for k in range(15)]
    # at or above the video's own rate: every frame once
    assert sample_indices(40, 8.0, fps=30).tolist() == list(range(40))
    with pytest.raises(ValueError, match="exactly one"):
        read_frames(clip40, num_frames=4, fps=2)


def test_reads_decode_only_the_chosen_frames_with_decord(clip40, monkeypatch):
    calls = []
    get_batch = decord.VideoReader.get_batch

    def spy(self, indices):
        calls.append(list(indices))
        return get_batch(self, indices)

    monkeypatch.setattr(decord.VideoReader, "get_batch", spy)
    read_frames(clip40, num_frames=3)
    assert calls == [[6, 20, 33]]


def test_write_read_round_trip(clip40, tmp_path):
    info = video_info(clip40)
    assert (info.frames, info.fps, info.height, info.width, info.duration) == (40, 8.0, 32, 64, 5.0)
    frames = read_frames(clip40, num_frames=40)
    assert frames.shape == (40, 32, 64, 3) and frames.dtype == np.uint8
    assert np.abs(frames.astype(int) - counting_clip(40).astype(int)).max() <= 3
    small = read_frames(clip40, num_frames=2, size=(16, 24))  # resized by decord while decoding
    assert small.shape == (2, 16, 24, 3)
    # width 48: FFmpeg pads the RGB rows and decord's get_batch refuses them; the frame-by-frame path
    frames48 = counting_clip(6, size=(32, 48))
    path = write_video(tmp_path / "w48.mp4", frames48, fps=25)
    assert video_info(path).fps == 25.0
    back = read_frames(path, num_frames=6)
    assert back.shape == (6, 32, 48, 3) and np.abs(back.astype(int) - frames48.astype(int)).max() <= 3


def test_write_video_falls_back_to_mpeg4(tmp_path, monkeypatch):
    monkeypatch.setattr(av, "codecs_available", av.codecs_available - {"libx264"})
    path = write_video(tmp_path / "m.mp4", counting_clip(8), fps=8)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
    assert frame_numbers(read_frames(path, num_frames=8)) == list(range(8))


def test_write_video_rejects_odd_sizes_and_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 31, 32, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", np.zeros((2, 32, 32, 3), np.float32), fps=8)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_bad_videos_raise_media_error_naming_the_file(tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(MediaError, match=rf"{missing}.*does not exist"):
        read_frames(missing, num_frames=4)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(MediaError, match=rf"{corrupt}.*corrupt"):
        read_frames(corrupt, num_frames=4)
    empty = tmp_path / "empty.mp4"  # a valid container header and no frames
    with av.open(str(empty), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 32
        container.start_encoding()
    with pytest.raises(MediaError, match=str(empty)):
        video_info(empty)
    assert isinstance(MediaError("x"), ValueError)


def test_images(tmp_path):
    rgba = np.zeros((10, 14, 4), np.uint8)
    rgba[..., 1] = 200
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.fromarray(np.full((6, 8), 77, np.uint8)).save(tmp_path / "grey.png")
    image = read_image(tmp_path / "a.png")
    assert image.shape == (10, 14, 3) and image.dtype == np.uint8 and image[..., 1].min() == 200
    assert read_image(tmp_path / "grey.png").shape == (6, 8, 3)
    assert read_image(tmp_path / "a.png", size=(4, 6)).shape == (4, 6, 3)
    assert image_info(tmp_path / "a.png") == image_info(tmp_path / "a.png")
    assert (image_info(tmp_path / "a.png").width, image_info(tmp_path / "a.png").height) == (14, 10)
    with pytest.raises(MediaError, match=r"nope\.png.*does not exist"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(MediaError, match=r"bad\.png"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(MediaError, match=r"bad\.png"):
        image_info(tmp_path / "bad.png")


def test_to_pixels_squares_and_normalises_to_minus_one_one():
    frames = np.zeros((3, 20, 30, 3), np.uint8)
    frames[1] = 255
    frames[2, :, :15] = 255
    pixels = to_pixels(frames, 16)
    assert pixels.shape == (3, 3, 16, 16) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.allclose(pixels[0], torch.tensor(-1.0)) and torch.allclose(pixels[1], torch.tensor(1.0))
    # stretched to the square, not cropped: the left half stays white, the right half black
    assert torch.allclose(pixels[2, :, :, :7], torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(pixels[2, :, :, 9:], torch.tensor(-1.0), atol=1e-5)
    imagenet = to_pixels(frames[1:2], 16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert torch.allclose(
        imagenet[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    )
    assert to_pixels(frames[:0], 16).shape == (0, 3, 16, 16)

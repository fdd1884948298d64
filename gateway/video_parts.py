"""A video content part, in every front's shape: the URL (a base64 ``data:`` URI or a fetched http(s)
URL) and its own options — ``fps``, ``max_frames``, ``audio_track`` — checked once for all fronts.
Pure Python, event-loop thread.
"""

from __future__ import annotations

from typing import Any

from gateway.request import Part, b64, bad
from mmserve_core.wire import types as T

# A video part's own options (beside its URL, in every front): mmserve's extension, documented in the README.
VIDEO_OPTIONS = ("fps", "max_frames", "audio_track")
VIDEO_MIME = ("video/", "image/gif")


def video_options(spec: dict, where: str) -> T.VideoOptions:
    """``fps`` (frames sampled a second, in (0, 30]), ``max_frames`` (2 up to the processor's cap, which
    the encoder checks) and ``audio_track`` (the video's own audio after its frames; default true)."""
    fps, frames, track = spec.get("fps"), spec.get("max_frames"), spec.get("audio_track", True)
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 30):
        raise bad(f"{where}.fps must be a number in (0, 30], got {fps!r}", f"{where}.fps")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 2):
        raise bad(f"{where}.max_frames must be an integer of at least 2, got {frames!r}", f"{where}.max_frames")
    if not isinstance(track, bool):
        raise bad(f"{where}.audio_track must be true or false, got {track!r}", f"{where}.audio_track")
    return T.VideoOptions(float(fps or 0.0), int(frames or 0), track)


def video_content(url: Any, options: T.VideoOptions, param: str, allow_urls: bool, *, url_param: str,
                  options_param: str) -> Part:
    """A video given as a URL string (OpenAI-style ``video_url``, Responses ``input_video``): a base64
    ``data:`` URI (``video/*``, or ``image/gif`` for an animated GIF), or an http(s) URL the gateway
    fetches when fetching is on."""
    if not isinstance(url, str) or not url:
        raise bad(f"{url_param} must be a non-empty string", url_param)
    part = Part("video", param, media=T.MediaInput(T.VIDEO, b"", "", video=options), options_param=options_param)
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise bad("video data: URIs must be base64-encoded", url_param)
        mime = header[5:].split(";")[0]
        if mime and not mime.startswith(VIDEO_MIME):
            raise bad(f"data: URI has media type {mime!r}, expected video/* (or image/gif)", url_param)
        part.media = T.MediaInput(T.VIDEO, b64(payload, url_param), mime, video=options)
        return part
    if url.startswith(("http://", "https://")):
        if not allow_urls:
            raise bad("fetching video URLs is disabled on this server; send the video as a data: URI", url_param)
        part.url, part.url_param = url, url_param
        return part
    raise bad(f"{url_param} must be a data: URI", url_param)

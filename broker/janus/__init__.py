"""The broker's side of Janus, the SFU that forwards group sessions' end-to-end encrypted frames.

``client`` speaks Janus's JSON API over HTTP; ``rooms`` keeps one VideoRoom room per session and
grants each admitted participant credentials for that room only; ``scheduling`` decides, when a
session is scheduled, whether it uses the peer-to-peer mesh or Janus.
"""

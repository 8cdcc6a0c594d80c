"""Speed and memory measurement of the yoloattn layers and of whole models (``yoloattn bench``):
:mod:`.layers` (every backend of every layer), :mod:`.models` (inference and training steps), :mod:`.profile`
(where BRA's time goes) and :mod:`.report` (the command)."""

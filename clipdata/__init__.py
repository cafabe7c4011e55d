"""Data formats: the pkl codec and its index, JPEG headers, lists and labels, video probing and decoding.
Imports only ``common`` (docs/design.md "Code layout")."""

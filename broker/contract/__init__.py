"""The protocol as machine-readable documents, generated from the code that defines it.

JSON Schema for every WebSocket message (``messages``), an AsyncAPI 3.0 document for the
signaling socket (``asyncapi``), an OpenAPI 3.1 document for the therapists' JSON API
(``openapi``, its routes read from the aiohttp application by ``http_routes``), and the files
they are written to under ``docs/contract/`` (``files``): ``broker contract write`` makes them,
and a test fails when the checked-in copies differ from a fresh generation.
"""

"""The server's routes, one router per protocol, over one shared `ServerContext`.

* :mod:`~qwenkit.server.routes.openai_api`: chat completions, completions, models.
* :mod:`~qwenkit.server.routes.responses_api`: OpenAI Responses, stored responses.
* :mod:`~qwenkit.server.routes.dashscope_api`: DashScope text generation.
* :mod:`~qwenkit.server.routes.operations`: health and metrics.

The web page's API has its own router (:mod:`qwenkit.server.web.api`). Each handler
translates with its protocol module, opens the generation through the context (a request
slot, metrics, the deadline) and answers through :func:`qwenkit.server.respond.respond`.
A client that leaves is noticed around the whole app (:mod:`qwenkit.server.watch`), which
cancels the handler wherever it is; a route only names its request
(:func:`~qwenkit.server.watch.name_request`) when the answer has an id of its own.
"""

"""qwenkit.client: chat with the local engine or a remote endpoint, with advisors,
memory, tools and retrieval (docs/retrieval.md). Imports without torch (the engine loads
only for `LocalChatModel`).

    from qwenkit.client import ChatClient, OpenAIChatModel, MessageChatMemoryAdvisor, SQLiteChatMemory, tool

    client = ChatClient(OpenAIChatModel("http://127.0.0.1:8000/v1", "sk-...", "qwen3"),
                        default_advisors=[MessageChatMemoryAdvisor(SQLiteChatMemory("chat.db"))])
    print(client.prompt("Hello").advisors(conversation_id="42").call().content())
"""

from qwenkit.client.advisors import (
    CONVERSATION_ID, AdvisedRequest, Advisor, MessageChatMemoryAdvisor, PromptChatMemoryAdvisor,
    ReasoningContentAdvisor, SafeGuardAdvisor, SimpleLoggerAdvisor,
)
from qwenkit.client.documents import Document, read_documents, split_markdown, split_text
from qwenkit.client.embedding import (
    EmbeddingModel, LocalEmbeddingModel, LocalReranker, OpenAIEmbeddingModel, OpenAIReranker, Reranker,
)
from qwenkit.client.chat_client import (
    AsyncStreamResponse, CallResponse, ChatClient, PromptRequest, StreamResponse, parse_entity, response_format_for,
)
from qwenkit.client.memory import ChatMemory, InMemoryChatMemory, SQLiteChatMemory
from qwenkit.client.mcp import MCPToolset, load_mcp_config
from qwenkit.client.models import ChatModel, DashScopeChatModel, LocalChatModel, OpenAIChatModel
from qwenkit.client.retrieval import RETRIEVED_DOCUMENTS, RetrievalAdvisor, index_folder, sources
from qwenkit.client.tools import Tool, tool
from qwenkit.client.types import (
    ChatOptions, ChatResponse, ChatResponseChunk, Media, ToolCall, ToolLoopEnd, ToolLoopOutcome, Usage,
)
from qwenkit.client.vector_store import VectorStore, reciprocal_rank_fusion

__all__ = [
    "CONVERSATION_ID", "AdvisedRequest", "Advisor", "AsyncStreamResponse", "CallResponse", "ChatClient", "ChatMemory",
    "ChatModel", "ChatOptions", "ChatResponse", "ChatResponseChunk", "DashScopeChatModel", "InMemoryChatMemory",
    "LocalChatModel", "MCPToolset", "Media", "MessageChatMemoryAdvisor", "OpenAIChatModel", "PromptChatMemoryAdvisor", "PromptRequest", "ReasoningContentAdvisor", "SQLiteChatMemory",
    "SafeGuardAdvisor", "SimpleLoggerAdvisor", "StreamResponse", "Tool", "ToolCall", "Usage", "parse_entity",
    "load_mcp_config", "response_format_for", "tool", "ToolLoopEnd", "ToolLoopOutcome",
    # Retrieval (docs/retrieval.md)
    "Document", "EmbeddingModel", "LocalEmbeddingModel", "LocalReranker", "OpenAIEmbeddingModel", "OpenAIReranker",
    "RETRIEVED_DOCUMENTS", "Reranker", "RetrievalAdvisor", "VectorStore", "index_folder", "read_documents",
    "reciprocal_rank_fusion", "sources", "split_markdown", "split_text",
]

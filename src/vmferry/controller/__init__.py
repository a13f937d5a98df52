"""vmferry.controller: orchestration of migrations across agents, and history."""

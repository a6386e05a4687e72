-- Pure helpers of the cellbox plugin (no editor state): cells in a buffer's lines, what the
-- daemon sends turned into lines of the output buffer or into a prompt, and the `mcp_servers`
-- option checked.
local M = {}

-- The cell markers of VS Code's Python tooling: `# %%` (also `#%%` and `# %% [markdown]`),
-- `# <codecell>` and `# In[ ]` / `# In[12]`, at the start of a line.
local MARKERS = { "^#%s*%%%%", "^#%s*<codecell>", "^#%s*In%[[%d ]*%]" }

function M.is_marker(line)
  for _, pattern in ipairs(MARKERS) do
    if line:find(pattern) then
      return true
    end
  end
  return false
end

--- The code lines of the cell holding line `row` of `lines` (1-based; a marker line belongs to
--- the cell it opens). Returns `first, last`, 1-based and inclusive, without the marker;
--- `first > last` for an empty cell. The first cell is what comes before the first marker.
function M.cell_at(lines, row)
  local first, last = 1, #lines
  for i = row, 1, -1 do
    if M.is_marker(lines[i]) then
      first = i + 1
      break
    end
  end
  for i = row + 1, #lines do
    if M.is_marker(lines[i]) then
      last = i - 1
      break
    end
  end
  return first, last
end

-- What a terminal would leave of a line: a bare "\r" returns to the start of the line, so
-- progress output ("10%\r20%\r") shows its last state.
local function render(line)
  line = line:gsub("\r+$", "")
  return (line:match("[^\r]*$"))
end

--- Streamed text as buffer lines. `open` is the unfinished last line written so far (raw text,
--- nil when the last write ended a line). Returns the lines that replace that unfinished line
--- (all lines, when `open` is nil) and the new unfinished line, nil when `text` ends a line.
--- `feed(nil, s)` is the lines of a whole string `s`.
function M.feed(open, text)
  -- Joined first, so a "\r\n" split across two chunks is still one line break.
  local raw = ((open or "") .. text):gsub("\r\n", "\n")
  local lines, start = {}, 1
  while true do
    local newline = raw:find("\n", start, true)
    if not newline then
      break
    end
    lines[#lines + 1] = render(raw:sub(start, newline - 1))
    start = newline + 1
  end
  local rest = raw:sub(start)
  if rest == "" then
    return lines, nil
  end
  lines[#lines + 1] = render(rest)
  return lines, rest
end

--- The lines of a `cellbox/display`: images by the file they were saved to, other outputs by
--- their `text/plain` (an expression's value), else by their MIME types.
function M.display_lines(data, path)
  local mimes = {}
  for mime in pairs(data) do
    mimes[#mimes + 1] = mime
  end
  table.sort(mimes)
  if path then
    for _, mime in ipairs(mimes) do
      if mime:find("^image/") then
        return { string.format("[display %s → %s]", mime, path) }
      end
    end
  end
  if data["text/plain"] then
    return (M.feed(nil, data["text/plain"]))
  end
  return { string.format("[display %s]", table.concat(mimes, ", ")) }
end

--- The lines that end an execution in the output buffer: the error's traceback (or its name and
--- value when it has none), then a status line such as `<<< error [2]`.
function M.result_lines(result)
  local lines = {}
  local err = result.error
  if err then
    if err.traceback and #err.traceback > 0 then
      -- Traceback entries hold line breaks of their own; Jupyter joins them with "\n".
      lines = M.feed(nil, table.concat(err.traceback, "\n"))
    else
      lines = { string.format("%s: %s", err.ename, err.evalue) }
    end
  end
  local status = "<<< " .. result.status
  if result.executionCount then
    status = string.format("%s [%d]", status, result.executionCount)
  end
  if result.truncated then
    status = status .. " (output truncated)"
  end
  lines[#lines + 1] = status
  return lines
end

local MAX_ARGUMENT_CHARS = 500
local MIN_VALUE_CHARS = 40

--- A tool call's arguments, one key a line as `  "key": <value's JSON>`: every key, by name, each
--- value cut to its share of `max_chars` (at least 40 characters, not bytes). The sandbox chose
--- them, and must not hide a key behind another's long value. Keys are JSON-quoted: a key's
--- newline cannot fake another line.
function M.arguments_text(arguments, max_chars)
  max_chars = max_chars or MAX_ARGUMENT_CHARS
  if type(arguments) ~= "table" or next(arguments) == nil then
    return "(no arguments)"
  end
  local keys = vim.tbl_keys(arguments)
  table.sort(keys, function(a, b)
    return tostring(a) < tostring(b)
  end)
  local share = math.max(MIN_VALUE_CHARS, math.floor(max_chars / #keys))
  local lines = {}
  for _, key in ipairs(keys) do
    local text = vim.fn.json_encode(arguments[key])
    local length = vim.fn.strchars(text)
    if length > share then
      text = string.format("%s... (%d characters in all)", vim.fn.strcharpart(text, 0, share), length)
    end
    lines[#lines + 1] = string.format("  %s: %s", vim.fn.json_encode(tostring(key)), text)
  end
  return table.concat(lines, "\n")
end

--- The question of a `cellbox/approveToolCall` request: the tool, its server and the arguments
--- (`arguments_text`). Names are JSON-quoted: a tool's name comes from the server, and cannot
--- break the prompt's lines so.
function M.approval_message(params, max_chars)
  return string.format(
    "cellbox: allow a cell to call the tool %s of the MCP server %s?\nArguments:\n%s",
    vim.fn.json_encode(params.tool),
    vim.fn.json_encode(params.server),
    M.arguments_text(params.arguments, max_chars)
  )
end

-- MCP servers ------------------------------------------------------------------------------

-- The sandbox imports a server's tools as `mcptools.<name>`: the daemon's names, keywords excluded.
local KEYWORDS = {}
local KEYWORD_LIST = "False None True and as assert async await break class continue def del elif else except "
  .. "finally for from global if import in is lambda nonlocal not or pass raise return try while with yield"
for keyword in KEYWORD_LIST:gmatch("%S+") do
  KEYWORDS[keyword] = true
end
-- MCP hosts' optional `type` of a server, and the field that server needs.
local TRANSPORTS = { stdio = "command", http = "url", ["streamable-http"] = "url" }
local FIELDS = { "command", "args", "env", "cwd", "url", "headers", "type", "approval" }

local function is_name(name)
  return type(name) == "string"
    and #name <= 64
    and name:find("^[A-Za-z_][A-Za-z0-9_]*$") ~= nil
    and not KEYWORDS[name]
end

-- A valid name close to `name`, for the message that refuses it (a character, not a byte, per `_`).
local function suggest_name(name)
  local suggestion = vim.fn.substitute(vim.trim(tostring(name)), "[^A-Za-z0-9_]", "_", "g")
  if suggestion == "" then
    suggestion = "server"
  end
  if suggestion:find("^%d") or KEYWORDS[suggestion] then
    suggestion = "_" .. suggestion
  end
  return suggestion:sub(1, 64)
end

local function is_strings(value)
  if type(value) ~= "table" then
    return false
  end
  local count = 0
  for _, item in pairs(value) do
    count = count + 1
    if type(item) ~= "string" then
      return false
    end
  end
  return count == #value
end

local function is_string_map(value)
  if type(value) ~= "table" then
    return false
  end
  for key, item in pairs(value) do
    if type(key) ~= "string" or type(item) ~= "string" then
      return false
    end
  end
  return true
end

-- An empty table is encoded as `[]`, which `env` and `headers` must not be: left out instead.
local function nonempty(value)
  if value ~= nil and next(value) ~= nil then
    return value
  end
end

local function by_text(a, b)
  return tostring(a) < tostring(b)
end

-- The registration of one entry, or why it cannot be registered.
local function mcp_server(name, entry)
  if not is_name(name) then
    return "the name must be a Python identifier of at most 64 characters, not a keyword, since the sandbox "
      .. "imports the server's tools as mcptools.<name>: e.g. "
      .. vim.fn.json_encode(suggest_name(name))
  end
  if type(entry) ~= "table" then
    return 'expected a table with "command" (a server the daemon runs) or "url" (streamable HTTP)'
  end
  local extra = {}
  for field in pairs(entry) do
    if not vim.tbl_contains(FIELDS, field) then
      extra[#extra + 1] = field
    end
  end
  if #extra > 0 then
    table.sort(extra, by_text)
    return string.format(
      "unknown %s: a server has command, args, env, cwd, or url, headers; and type, approval",
      table.concat(vim.tbl_map(vim.fn.json_encode, extra), ", ")
    )
  end
  local approval = entry.approval or "ask"
  if approval ~= "ask" and approval ~= "never" then
    return '"approval" is "ask" or "never", not ' .. vim.fn.json_encode(approval)
  end
  local transport = TRANSPORTS[entry.type]
  if entry.type ~= nil and not transport then
    return string.format(
      '"type" %s is not served: "stdio", or "http" (streamable HTTP)',
      vim.fn.json_encode(entry.type)
    )
  end
  if entry.command == nil and entry.url == nil then
    return 'needs "command" (a server the daemon runs) or "url" (streamable HTTP)'
  end
  if entry.command ~= nil and entry.url ~= nil then
    return '"command" and "url" exclude each other: give one'
  end
  if transport and entry[transport] == nil then
    return string.format('a server of "type" %s needs "%s"', vim.fn.json_encode(entry.type), transport)
  end
  local server
  if entry.command ~= nil then
    if type(entry.command) ~= "string" or entry.command == "" then
      return '"command" must be a non-empty string'
    elseif entry.headers ~= nil then
      return '"headers" are for a "url" server'
    elseif entry.args ~= nil and not is_strings(entry.args) then
      return '"args" must be a list of strings'
    elseif entry.env ~= nil and not is_string_map(entry.env) then
      return '"env" must be a table of strings by name'
    elseif entry.cwd ~= nil and type(entry.cwd) ~= "string" then
      return '"cwd" must be a string'
    end
    server =
      { command = entry.command, args = nonempty(entry.args), env = nonempty(entry.env), cwd = entry.cwd }
  else
    if type(entry.url) ~= "string" or not entry.url:find("^https?://") then
      return '"url" must be an http:// or https:// URL'
    elseif entry.args ~= nil or entry.env ~= nil or entry.cwd ~= nil then
      return '"args", "env" and "cwd" are for a "command" server'
    elseif entry.headers ~= nil and not is_string_map(entry.headers) then
      return '"headers" must be a table of strings by name'
    end
    server = { url = entry.url, headers = nonempty(entry.headers) }
  end
  return { name = name, server = server, approval = approval }
end

--- The `mcp_servers` option, a table in the `mcpServers` shape of MCP hosts, as the params of
--- `cellbox/registerMcpServer` (without `sandboxId`) sorted by name, and a message for each
--- entry left out.
function M.mcp_servers(servers)
  local registrations, problems = {}, {}
  if servers == nil then
    return registrations, problems
  end
  if type(servers) ~= "table" then
    return registrations,
      { 'mcp_servers must be a table of servers by name, like an MCP host\'s "mcpServers"' }
  end
  local names = vim.tbl_keys(servers)
  table.sort(names, by_text)
  for _, name in ipairs(names) do
    local registration = mcp_server(name, servers[name])
    if type(registration) == "string" then
      problems[#problems + 1] =
        string.format("mcp_servers[%s]: %s; not registered", vim.fn.json_encode(name), registration)
    else
      registrations[#registrations + 1] = registration
    end
  end
  return registrations, problems
end

--- The output buffer's line for a registered server: its package and its tools' functions.
function M.registered_line(result)
  local functions = vim.tbl_map(function(tool)
    return tool["function"]
  end, result.tools)
  return string.format(
    "[registered %s: %s]",
    result.package,
    #functions > 0 and table.concat(functions, ", ") or "no tools"
  )
end

return M

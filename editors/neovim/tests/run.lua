-- Headless test of the cellbox plugin against a real daemon; from the repository's root:
--   nvim --headless --clean -u NONE -c 'set rtp+=editors/neovim' -c 'luafile editors/neovim/tests/run.lua'
-- The daemon's command is $CELLBOX_SERVE split on spaces (default `python3 -m cellboxd serve`).
-- Exits 0 after printing "cellbox-neovim: N passed", 1 after printing the first failure.

local WAIT_MS = 90000 -- a first kernel may take a while to start

vim.cmd("runtime! plugin/cellbox.lua") -- -u NONE loads no plugins
local cells = require("cellbox.cells")
local cellbox = require("cellbox")

local passed = 0

-- A failed check raises a table, so that the report shows it without a Lua traceback.
local function check(ok, what)
  if not ok then
    error({ failed = what })
  end
  passed = passed + 1
end

local function eq(actual, expected, what)
  check(
    vim.deep_equal(actual, expected),
    string.format("%s: expected %s, got %s", what, vim.inspect(expected), vim.inspect(actual))
  )
end

local notes = {}

-- Notifications are recorded, so that the test can see the errors the plugin reports.
vim.notify = function(message, level)
  table.insert(notes, { message = message, level = level })
end

local function buffer_named(name)
  for _, buf in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_get_name(buf) == name then
      return buf
    end
  end
end

local function lines_of(name)
  local buf = buffer_named(name)
  return buf and vim.api.nvim_buf_get_lines(buf, 0, -1, false) or {}
end

local function count_lines(name, pattern)
  local n = 0
  for _, line in ipairs(lines_of(name)) do
    if line:find(pattern) then
      n = n + 1
    end
  end
  return n
end

local function has_line(name, line)
  return vim.tbl_contains(lines_of(name), line)
end

local function cellbox_client()
  for _, client in ipairs((vim.lsp.get_clients or vim.lsp.get_active_clients)()) do
    if client.name == "cellbox" then
      return client
    end
  end
end

local function test_cells()
  for _, marker in ipairs({ "# %%", "#%%", "# %% [markdown]", "# <codecell>", "# In[3]", "# In[ ]" }) do
    check(cells.is_marker(marker), marker .. " is a cell marker")
  end
  for _, line in ipairs({ "x = 1  # %%", "  # %%", "# %", "print('# %%')" }) do
    check(not cells.is_marker(line), line .. " is no cell marker")
  end

  local lines = { "import os", "# %%", "x = 41", "print('first')", "# %%", "print(x + 1)", "1/0" }
  eq({ cells.cell_at(lines, 1) }, { 1, 1 }, "the first cell is what comes before the first marker")
  eq({ cells.cell_at(lines, 2) }, { 3, 4 }, "a marker line runs the cell it opens")
  eq({ cells.cell_at(lines, 4) }, { 3, 4 }, "a cell ends before the next marker")
  eq({ cells.cell_at(lines, 7) }, { 6, 7 }, "the last cell ends with the buffer")
  eq({ cells.cell_at({ "a", "b" }, 2) }, { 1, 2 }, "without markers the buffer is one cell")
  eq({ cells.cell_at({ "a", "# %%" }, 2) }, { 3, 2 }, "a marker on the last line opens an empty cell")

  eq({ cells.feed(nil, "a\nb") }, { { "a", "b" }, "b" }, "an unfinished line stays open")
  eq({ cells.feed("b", "c\n") }, { { "bc" }, nil }, "a partial line is joined with the next chunk")
  eq({ cells.feed(nil, "x\r\ny\r\n") }, { { "x", "y" }, nil }, "CRLF ends lines")
  eq({ cells.feed("x\r", "\ny") }, { { "x", "y" }, "y" }, "a CRLF split across chunks is one line break")
  eq({ cells.feed(nil, "10%\r20%\r") }, { { "20%" }, "10%\r20%\r" }, "a bare CR returns to the line's start")
  eq({ cells.feed(nil, "\n\n") }, { { "", "" }, nil }, "empty lines are kept")
  eq({ cells.feed(nil, "") }, { {}, nil }, "no text, no lines")

  eq(
    cells.display_lines({ ["image/png"] = "iVBOR", ["text/plain"] = "<Figure>" }, "/w/images/nvim-1-1.png"),
    { "[display image/png → /w/images/nvim-1-1.png]" },
    "an image is shown by its file"
  )
  eq(cells.display_lines({ ["text/plain"] = "(1,\n 2)" }), { "(1,", " 2)" }, "a value is shown by its text")
  eq(
    cells.display_lines({ ["text/html"] = "<b>" }),
    { "[display text/html]" },
    "other outputs by their MIME type"
  )

  eq(
    cells.result_lines({ status = "ok", executionCount = 1, truncated = false }),
    { "<<< ok [1]" },
    "an ok result"
  )
  eq(
    cells.result_lines({
      status = "error",
      executionCount = 2,
      truncated = true,
      error = {
        ename = "ZeroDivisionError",
        evalue = "division by zero",
        traceback = { "---", "Cell In[2], line 1\n----> 1 1/0\n", "ZeroDivisionError: division by zero" },
      },
    }),
    {
      "---",
      "Cell In[2], line 1",
      "----> 1 1/0",
      "",
      "ZeroDivisionError: division by zero",
      "<<< error [2] (output truncated)",
    },
    "an error shows its traceback's lines"
  )
  eq(
    cells.result_lines({
      status = "died",
      truncated = false,
      error = { ename = "KernelDied", evalue = "gone", traceback = {} },
    }),
    { "KernelDied: gone", "<<< died" },
    "an error without a traceback shows its name and value"
  )

  local call = { server = "time", tool = "get_current_time", arguments = { timezone = "UTC" } }
  eq(
    cells.approval_message(call),
    'cellbox: allow a cell to call the tool "get_current_time" of the MCP server "time"?\n'
      .. 'Arguments:\n  "timezone": "UTC"',
    "a tool call's prompt names the tool, its server and the arguments"
  )
  eq(
    cells.approval_message({ server = "s", tool = "t\nAllowed", arguments = vim.empty_dict() }),
    'cellbox: allow a cell to call the tool "t\\nAllowed" of the MCP server "s"?\nArguments:\n(no arguments)',
    "names are quoted, no arguments say so"
  )
  eq(cells.arguments_text(nil), "(no arguments)", "absent arguments are none")
  eq(
    cells.arguments_text({ b = { c = vim.NIL }, a = { 1, 2 }, ['x\n  "y'] = 1 }),
    '  "a": [1, 2]\n  "b": {"c": null}\n  "x\\n  \\"y": 1',
    "every key a line, by name, JSON-quoted so that a newline in one cannot fake a line"
  )
  eq(
    cells.approval_message({ server = "s", tool = "t", arguments = { text = "é" .. ("x"):rep(60) } }, 12),
    'cellbox: allow a cell to call the tool "t" of the MCP server "s"?\n'
      .. 'Arguments:\n  "text": "é'
      .. ("x"):rep(38)
      .. "... (63 characters in all)",
    "a long value is cut by characters, to at least 40"
  )
  local padded = cells.approval_message({
    server = "s",
    tool = "t",
    arguments = { pad = ("x"):rep(2000), cmd = "rm -rf ~" },
  })
  eq(vim.split(padded, "\n"), {
    'cellbox: allow a cell to call the tool "t" of the MCP server "s"?',
    "Arguments:",
    '  "cmd": "rm -rf ~"',
    '  "pad": "' .. ("x"):rep(249) .. "... (2002 characters in all)",
  }, "padding cannot push a key out of sight: each gets its share of the limit")
  local many = {}
  for i = 1, 100 do
    many[string.format("k%03d", i)] = ("y"):rep(50)
  end
  local lines = vim.split(cells.arguments_text(many), "\n")
  eq(#lines, 100, "every key is shown, however many")
  eq(
    lines[100],
    '  "k100": "' .. ("y"):rep(39) .. "... (52 characters in all)",
    "each value gets at least 40"
  )
end

local function test_mcp_servers()
  local registrations, problems = cells.mcp_servers({
    time = { command = "uvx", args = { "mcp-server-time" }, env = { TZ = "UTC" }, cwd = "/tmp" },
    docs = {
      type = "http",
      url = "https://example.com/mcp",
      headers = { Authorization = "Bearer x" },
      approval = "never",
    },
    plain = { command = "mcp-plain", args = {}, env = vim.empty_dict() },
  })
  eq(problems, {}, "a valid mcp_servers has no problems")
  eq(registrations, {
    {
      name = "docs",
      server = { url = "https://example.com/mcp", headers = { Authorization = "Bearer x" } },
      approval = "never",
    },
    { name = "plain", server = { command = "mcp-plain" }, approval = "ask" },
    {
      name = "time",
      server = { command = "uvx", args = { "mcp-server-time" }, env = { TZ = "UTC" }, cwd = "/tmp" },
      approval = "ask",
    },
  }, "servers become registerMcpServer params, by name; empty tables are left out")
  eq(vim.fn.json_encode(registrations[2].server), '{"command": "mcp-plain"}', "no empty env sent as []")
  eq({ cells.mcp_servers(nil) }, { {}, {} }, "no mcp_servers, no servers")

  local function problem(entry)
    local servers, found = cells.mcp_servers({ s = entry })
    eq(servers, {}, "a malformed entry is not registered: " .. vim.inspect(entry))
    return found[1]:match('^mcp_servers%["s"%]: (.*); not registered$')
  end
  local cases = {
    { "uvx", 'expected a table with "command" (a server the daemon runs) or "url" (streamable HTTP)' },
    { {}, 'needs "command" (a server the daemon runs) or "url" (streamable HTTP)' },
    { { command = "c", url = "https://x" }, '"command" and "url" exclude each other: give one' },
    { { command = "" }, '"command" must be a non-empty string' },
    { { command = "c", args = "a b" }, '"args" must be a list of strings' },
    { { command = "c", args = { 1 } }, '"args" must be a list of strings' },
    { { command = "c", env = { N = 1 } }, '"env" must be a table of strings by name' },
    { { command = "c", env = { "A=1" } }, '"env" must be a table of strings by name' },
    { { command = "c", cwd = 1 }, '"cwd" must be a string' },
    { { command = "c", headers = { A = "b" } }, '"headers" are for a "url" server' },
    { { url = "ftp://x" }, '"url" must be an http:// or https:// URL' },
    { { url = "https://x", args = {} }, '"args", "env" and "cwd" are for a "command" server' },
    { { url = "https://x", headers = "Bearer x" }, '"headers" must be a table of strings by name' },
    { { command = "c", approval = "always" }, '"approval" is "ask" or "never", not "always"' },
    { { command = "c", type = "sse" }, '"type" "sse" is not served: "stdio", or "http" (streamable HTTP)' },
    { { command = "c", type = "http" }, 'a server of "type" "http" needs "url"' },
    {
      { command = "c", disabled = true, timeout = 5 },
      'unknown "disabled", "timeout": a server has command, args, env, cwd, or url, headers; and type, approval',
    },
  }
  for _, case in ipairs(cases) do
    eq(problem(case[1]), case[2], "the problem of " .. vim.inspect(case[1]))
  end

  local names = { "my-server", "2fa", "import", ("x"):rep(65), "café" }
  local entries = { _ok = { command = "c" }, match = { command = "c" } } -- a soft keyword is a fine name
  for _, name in ipairs(names) do
    entries[name] = { command = "c" }
  end
  local servers
  servers, problems = cells.mcp_servers(entries)
  eq(
    vim.tbl_map(function(server)
      return server.name
    end, servers),
    { "_ok", "match" },
    "only Python identifiers of at most 64 characters, no keywords, are names"
  )
  eq(
    problems[4],
    'mcp_servers["my-server"]: the name must be a Python identifier of at most 64 characters, not a keyword, '
      .. 'since the sandbox imports the server\'s tools as mcptools.<name>: e.g. "my_server"; not registered',
    "a refused name's message suggests one"
  )
  local suggested = vim.tbl_map(function(message)
    return message:match('e%.g%. "(%w*_?%w*)"')
  end, problems)
  -- by name: "2fa", "café", "import", "my-server", "xxx..."
  eq(suggested, { "_2fa", "caf_", "_import", "my_server", ("x"):rep(64) }, "the suggested names")
  eq({ cells.mcp_servers({ { command = "c" } }) }, {
    {},
    {
      "mcp_servers[1]: the name must be a Python identifier of at most 64 characters, not a keyword, since the "
        .. 'sandbox imports the server\'s tools as mcptools.<name>: e.g. "_1"; not registered',
    },
  }, "a list is no table of servers by name")
  eq(
    { cells.mcp_servers("time") },
    { {}, { 'mcp_servers must be a table of servers by name, like an MCP host\'s "mcpServers"' } },
    "mcp_servers must be a table"
  )

  local tool = function(name)
    return { name = name, ["function"] = name, description = "" }
  end
  local result =
    { name = "time", package = "mcptools.time", tools = { tool("get_current_time"), tool("convert_time") } }
  eq(
    cells.registered_line(result),
    "[registered mcptools.time: get_current_time, convert_time]",
    "a registered server's line names its functions"
  )
  result.tools = {}
  eq(cells.registered_line(result), "[registered mcptools.time: no tools]", "a server without tools")
end

local OUTPUT = "cellbox://output"

-- The lines by which the plugin reports a failed request or a daemon that went away.
local function problems()
  return count_lines(OUTPUT, "^%[error%]")
end

local expected_problems = 0 -- the failed install reports one

-- Waits until `predicate()`, or an unexpected problem is reported: that fails at once, not at the timeout.
local function wait_for(what, predicate)
  vim.wait(WAIT_MS, function()
    return predicate() or problems() > expected_problems
  end, 20)
  check(predicate(), "waited in vain for " .. what .. "; notifications: " .. vim.inspect(notes))
end

local function wait_results(n)
  wait_for(n .. " results in the output buffer", function()
    return count_lines(OUTPUT, "^<<< ") == n
  end)
end

-- A new named Python buffer, not backed by a file, holding `lines`.
local function python_buffer(name, lines)
  vim.cmd("enew")
  local buf = vim.api.nvim_get_current_buf()
  vim.bo[buf].buftype = "nofile"
  vim.bo[buf].filetype = "python"
  vim.api.nvim_buf_set_name(buf, vim.fn.tempname() .. "/" .. name)
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, lines)
  return buf
end

-- The lines of a cell that writes a one-file wheel to `path`, so that an install needs no index.
local function wheel_cell(path)
  return {
    "import zipfile",
    "info = 'cellbox_nvim_demo-0.1.dist-info/'",
    "files = {'cellbox_nvim_demo.py': 'ANSWER = 42\\n',",
    "         info + 'METADATA': 'Metadata-Version: 2.1\\nName: cellbox-nvim-demo\\nVersion: 0.1\\n',",
    "         info + 'WHEEL': 'Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n'}",
    "files[info + 'RECORD'] = ''.join(name + ',,\\n' for name in [*files, info + 'RECORD'])",
    "with zipfile.ZipFile('" .. path .. "', 'w') as wheel:",
    "    for name, text in files.items():",
    "        wheel.writestr(name, text)",
  }
end

local PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="

local function test_session()
  -- Neovim writes the daemon's stderr into its lsp.log.
  vim.env.CELLBOX_LOG_LEVEL = vim.env.CELLBOX_LOG_LEVEL or "warning"
  cellbox.setup({
    cmd = vim.fn.split(vim.env.CELLBOX_SERVE or "python3 -m cellboxd serve", " "),
    timeout = 60,
  })

  local buf = python_buffer("cells.py", { "# %%", "x = 41", "print('first')", "# %%", "print(x + 1)", "1/0" })
  vim.api.nvim_win_set_cursor(0, { 2, 0 })
  vim.cmd("CellboxRun")
  wait_results(1)
  check(has_line(OUTPUT, "first"), "the first cell's output is in the output buffer")
  check(has_line(OUTPUT, "<<< ok [1]"), "the first cell's status")
  check(count_lines(OUTPUT, "^>>> .*cells%.py:2%-3$") == 1, "the first cell's header names its lines")
  check(vim.fn.bufwinid(buffer_named(OUTPUT)) ~= -1, "the output buffer is shown in a window")
  eq(vim.bo[buf].omnifunc, "v:lua.vim.lsp.omnifunc", "the buffer's omnifunc")

  vim.api.nvim_win_set_cursor(0, { 5, 0 })
  vim.cmd("CellboxRun")
  wait_results(2)
  check(has_line(OUTPUT, "42"), "the second cell printed 42, seeing x from the first")
  check(count_lines(OUTPUT, "Traceback %(most recent call last%)") == 1, "the traceback is shown")
  check(has_line(OUTPUT, "ZeroDivisionError: division by zero"), "the traceback ends with the error")
  check(count_lines(OUTPUT, "^<<< error %[2%]$") == 1, "the second cell's status")
  local reported = vim.tbl_filter(function(note)
    return note.level == vim.log.levels.ERROR and note.message:find("ZeroDivisionError", 1, true)
  end, notes)
  check(#reported == 1, "the cell's error is reported: " .. vim.inspect(notes))

  vim.cmd("3CellboxRun")
  wait_results(3)
  check(count_lines(OUTPUT, "^first$") == 2, "a range runs its lines")
  eq(#vim.fn.win_findbuf(buffer_named(OUTPUT)), 1, "windows showing the output buffer")

  -- A second buffer shares the kernel.
  local display = "display({'image/png': '" .. PNG .. "', 'text/plain': '<dot>'}, raw=True)"
  python_buffer("displays.py", { "from IPython.display import display", display, "x + 13" })
  vim.cmd("CellboxRun")
  wait_results(4)
  check(has_line(OUTPUT, "54"), "an expression's value is shown")
  local image
  for _, line in ipairs(lines_of(OUTPUT)) do
    image = image or line:match("^%[display image/png → (.+%.png)%]$")
  end
  check(image and vim.fn.filereadable(image) == 1, "an image is shown by the file it was saved to")

  vim.cmd("CellboxSources json")
  wait_for("the sources buffer", function()
    return has_line("cellbox://sources", "# Module: json")
  end)
  eq(vim.bo[buffer_named("cellbox://sources")].filetype, "markdown", "the sources buffer's filetype")

  -- Completion comes from the kernel, where the first cell defined x = 41.
  vim.api.nvim_buf_set_lines(buf, -1, -1, false, { "x.bi" })
  local params = {
    textDocument = { uri = vim.uri_from_bufnr(buf) },
    position = { line = vim.api.nvim_buf_line_count(buf) - 1, character = 4 },
  }
  local responses = vim.lsp.buf_request_sync(buf, "textDocument/completion", params, 10000) or {}
  local offered = {}
  for _, response in pairs(responses) do
    local result = response.result or {}
    for _, item in ipairs(result.items or result) do
      table.insert(offered, item.label)
    end
  end
  check(
    vim.tbl_contains(offered, "bit_length"),
    "completion of x.bi offers bit_length (needs the daemon's bindDocument and completion); got "
      .. vim.inspect({ responses = responses, notes = notes })
  )

  expected_problems = 1
  vim.cmd("CellboxInstall --no-such-option")
  wait_for("the failed install's report", function()
    return count_lines(OUTPUT, "^%[error%] cellbox/installPackage failed: ") == 1
  end)
  check(notes[#notes].level == vim.log.levels.ERROR, "a request's error is notified as an error")

  local wheel = vim.fn.tempname() .. "/cellbox_nvim_demo-0.1-py3-none-any.whl"
  vim.fn.mkdir(vim.fn.fnamemodify(wheel, ":h"), "p")
  python_buffer("wheel.py", wheel_cell(wheel))
  vim.cmd("CellboxRunFile")
  wait_results(5)
  check(count_lines(OUTPUT, "^>>> .*wheel%.py$") == 1, "a file's header names it")
  vim.cmd("CellboxInstall " .. wheel)
  wait_for("the install", function()
    return has_line(OUTPUT, "[installed cellbox-nvim-demo 0.1]")
  end)

  python_buffer(
    "sleep.py",
    { "import time, cellbox_nvim_demo", "print('sleeping', flush=True)", "time.sleep(60)" }
  )
  vim.cmd("CellboxRun")
  wait_for("the cell to start", function()
    return has_line(OUTPUT, "sleeping")
  end)
  vim.cmd("CellboxInterrupt")
  wait_results(6)
  check(count_lines(OUTPUT, "^KeyboardInterrupt:") == 1, "an interrupted cell ends with KeyboardInterrupt")

  vim.cmd("CellboxRestart")
  wait_for("the restart", function()
    return has_line(OUTPUT, "[kernel restarted]")
  end)
  python_buffer("after.py", { "print('x' in globals())" })
  vim.cmd("CellboxRun")
  wait_results(7)
  check(has_line(OUTPUT, "False"), "a restarted kernel starts afresh")
end

-- Stops the daemon and waits for its process to end.
local function stop_daemon()
  local client = cellbox_client()
  if not client then
    return true
  end
  cellbox.stop()
  return vim.wait(15000, function()
    return vim.lsp.get_client_by_id(client.id) == nil
  end, 20)
end

-- confirm() as the user answers it: `answer` is the button's number, 0 for Esc.
local prompts = {}
local answer
vim.fn.confirm = function(message, choices, default, kind)
  table.insert(prompts, { message = message, choices = choices, default = default, kind = kind })
  return answer
end

local function test_tool_calls()
  local python = vim.fn.split(vim.env.CELLBOX_SERVE or "python3 -m cellboxd serve", " ")[1]
  -- the PyPI server `mcp-server-time`, run by the daemon's interpreter
  local args = { "-m", "mcp_server_time", "--local-timezone", "UTC" }
  -- The option applies to the next daemon's sandbox.
  check(stop_daemon(), "the first daemon stopped")
  cellbox.setup({
    mcp_servers = {
      time = { command = python, args = args },
      clock = { command = python, args = args, approval = "never" },
      broken = { command = python, args = { "-c", "import sys; sys.exit('no MCP here')" } },
      ["my-server"] = { command = python },
    },
  })
  python_buffer("tools.py", {
    "# %%",
    "print('tools')",
    "# %%",
    "from mcptools.time.get_current_time import get_current_time",
    "get_current_time(timezone='UTC')",
    "# %%",
    "from mcptools.clock.get_current_time import get_current_time",
    "get_current_time(timezone='UTC')",
  })
  local results = count_lines(OUTPUT, "^<<< ")
  local warned = #notes
  vim.api.nvim_win_set_cursor(0, { 2, 0 })
  vim.cmd("CellboxRun")
  results = results + 1
  wait_results(results)
  check(has_line(OUTPUT, "tools"), "a cell runs in the new daemon's sandbox")
  check(count_lines(OUTPUT, "^%[registered mcptools%.time: .*get_current_time") == 1, "time is registered")
  check(count_lines(OUTPUT, "^%[registered mcptools%.clock: .*get_current_time") == 1, "clock is registered")
  local warnings = vim.tbl_map(function(note)
    return note.message
  end, vim.list_slice(notes, warned + 1))
  eq(#warnings, 2, "two servers are left out: " .. vim.inspect(warnings))
  eq(
    warnings[1],
    'cellbox: mcp_servers["my-server"]: the name must be a Python identifier of at most 64 characters, '
      .. "not a keyword, since the sandbox imports the server's tools as mcptools.<name>: "
      .. 'e.g. "my_server"; not registered',
    "a misnamed server is reported"
  )
  local failed =
    '^cellbox: the MCP server "broken" was not registered: .* %(its output is in cellbox://output%)$'
  check(warnings[2]:find(failed), "a server that fails is reported: " .. warnings[2])
  eq(notes[#notes].level, vim.log.levels.WARN, "as a warning")
  check(has_line(OUTPUT, "no MCP here"), "the failed server's output is in the output buffer")
  eq(count_lines(OUTPUT, "^%[warning%] "), 2, "the warnings in the output buffer")

  local function counts()
    local values = count_lines(OUTPUT, "^{'timezone': 'UTC',$")
    return { #prompts, values, count_lines(OUTPUT, "^ToolCallRejected: ") }
  end
  -- Runs the tool's cell with the option `mode`, the user pressing `button` if asked.
  local function call_tool(mode, button, asked, approved, row)
    cellbox.setup({ approve_tool_calls = mode })
    answer = button
    local before = counts()
    vim.api.nvim_win_set_cursor(0, { row or 4, 0 })
    vim.cmd("CellboxRun")
    results = results + 1
    wait_results(results)
    local after = counts()
    eq(
      { after[1] - before[1], after[2] - before[2], after[3] - before[3] },
      { asked and 1 or 0, approved and 1 or 0, approved and 0 or 1 },
      string.format("mode %s, button %d: prompts, values and refusals", mode, button)
    )
  end
  call_tool("ask", 1, true, true) -- Allow
  eq(prompts[1], {
    message = 'cellbox: allow a cell to call the tool "get_current_time" of the MCP server "time"?\n'
      .. 'Arguments:\n  "timezone": "UTC"',
    choices = "&Allow\nAllow in this &sandbox\n&Deny",
    default = 3,
    kind = "Warning",
  }, "the prompt, Deny its default")
  call_tool("ask", 3, true, false) -- Deny
  call_tool("ask", 0, true, false) -- Esc
  call_tool("never", 1, false, false)
  call_tool("always", 0, false, true)
  call_tool("ask", 2, true, true) -- Allow in this sandbox
  call_tool("ask", 0, false, true) -- allowed already
  call_tool("never", 0, false, true, 7) -- clock, registered with approval "never", is not asked about
end

local ok, failure = xpcall(function()
  test_cells()
  test_mcp_servers()
  test_session()
  test_tool_calls()
end, function(err)
  return type(err) == "table" and err.failed or debug.traceback(err, 2)
end)
local stopped = stop_daemon()
if ok and not stopped then
  ok, failure = false, "the daemon did not exit within 15 s of shutdown"
end
if ok then
  io.stdout:write(string.format("cellbox-neovim: %d passed\n", passed))
  vim.cmd("cq 0")
else
  io.stderr:write(string.format("cellbox-neovim: FAILED after %d passed: %s\n", passed, failure))
  io.stderr:write("output buffer:\n  " .. table.concat(lines_of("cellbox://output"), "\n  ") .. "\n")
  vim.cmd("cq 1")
end

-- cellbox for Neovim (0.7+): runs `# %%` cells of Python buffers in a kernel of `cellbox serve`,
-- streams their output into a `cellbox://output` split, and gets completion and hover of the
-- buffers that ran code from that live kernel.
local cells = require("cellbox.cells")

local M = {}

local config = {
  cmd = { "cellbox", "serve" },
  backend = nil,
  image = nil,
  timeout = 120,
  approve_tool_calls = "ask", -- or "always", "never"
  mcp_servers = {}, -- name -> { command, args, env, cwd } or { url, headers }, with `approval`
}

-- One daemon, one sandbox and one kernel per Neovim session, shared by every buffer.
local state = {
  client_id = nil,
  ready = false, -- the daemon answered `initialize`
  on_ready = {}, -- callbacks waiting for it
  sandbox = nil, -- the createSandbox result
  kernel_id = nil,
  kernel_state = nil, -- the latest cellbox/kernelStatus
  on_kernel = nil, -- callbacks waiting for the kernel; a table while it starts
  labels = {}, -- executionId -> the header of its output, until its result
  next_execution = 0,
  no_editor_features = false, -- the daemon answered bindDocument with MethodNotFound
  stopping = false, -- M.stop() asked the daemon to exit
}

-- The output buffer; `open` is its unfinished last line (see cells.feed), `shown` the execution
-- whose header was written last.
local output = { buf = nil, open = nil, shown = nil }
local sources_buf = nil

function M.setup(opts)
  config = vim.tbl_extend("force", config, opts or {})
end

--- The state of the session's kernel (`idle`, `busy`, `dead`, ...), nil before it starts: for
--- a statusline.
function M.status()
  return state.kernel_state
end

-- Neovim 0.11 deprecated vim.lsp.start_client() for vim.lsp.start() and made the client's
-- functions methods (client:request()); 0.7 to 0.10 have only the older forms.
local modern_lsp = vim.fn.has("nvim-0.11") == 1

local function start_client(client_config)
  if modern_lsp then
    return vim.lsp.start(client_config, { attach = false })
  end
  return vim.lsp.start_client(client_config)
end

local function call(client, name, ...)
  if modern_lsp then
    return client[name](client, ...)
  end
  return client[name](...)
end

-- Output buffer ----------------------------------------------------------------------------

-- A `nofile` buffer named `name`, made once and reused (loaded again after a :bdelete).
local function scratch(buf, name)
  if buf and vim.api.nvim_buf_is_loaded(buf) then
    return buf
  end
  if not (buf and vim.api.nvim_buf_is_valid(buf)) then
    buf = vim.api.nvim_create_buf(false, true)
    vim.api.nvim_buf_set_name(buf, name)
  end
  vim.fn.bufload(buf)
  vim.bo[buf].buftype = "nofile"
  vim.bo[buf].bufhidden = "hide"
  vim.bo[buf].swapfile = false
  return buf
end

-- Writes `lines` in place of the unfinished last line (after the last line when there is none)
-- and scrolls the windows showing the output to the end.
local function write(lines, open)
  if #lines == 0 then
    return
  end
  local buf = scratch(output.buf, "cellbox://output")
  output.buf = buf
  local empty = vim.api.nvim_buf_line_count(buf) == 1
    and vim.api.nvim_buf_get_lines(buf, 0, 1, false)[1] == ""
  local start = (output.open or empty) and -2 or -1
  vim.bo[buf].modifiable = true
  vim.api.nvim_buf_set_lines(buf, start, -1, false, lines)
  vim.bo[buf].modifiable = false
  output.open = open
  local count = vim.api.nvim_buf_line_count(buf)
  for _, win in ipairs(vim.fn.win_findbuf(buf)) do
    vim.api.nvim_win_set_cursor(win, { count, 0 })
  end
end

local function append_text(text)
  write(cells.feed(output.open, text))
end

-- Whole lines, after the unfinished line if there is one.
local function append_lines(lines)
  output.open = nil
  write(lines, nil)
end

local function heading(text, execution_id)
  append_lines({ ">>> " .. text })
  output.shown = execution_id
end

-- Writes an execution's header before its first output, not when it is sent: executes of one
-- kernel run one at a time, so a queued cell's header does not land inside the running one's output.
local function enter(execution_id)
  if output.shown ~= execution_id and state.labels[execution_id] then
    heading(state.labels[execution_id], execution_id)
  end
end

local function show_output()
  output.buf = scratch(output.buf, "cellbox://output")
  if vim.fn.bufwinid(output.buf) ~= -1 then
    return
  end
  local win = vim.api.nvim_get_current_win()
  vim.cmd("botright 12split")
  vim.api.nvim_win_set_buf(0, output.buf)
  vim.api.nvim_win_set_cursor(0, { vim.api.nvim_buf_line_count(output.buf), 0 })
  vim.api.nvim_set_current_win(win)
end

-- Notifies `message` and writes it to the output, tagged, with `extra_lines` after it.
local function tell(level, tag, message, extra_lines)
  vim.notify("cellbox: " .. message, level)
  local lines = cells.feed(nil, tag .. message)
  vim.list_extend(lines, extra_lines or {})
  append_lines(lines)
end

local function report(message, extra_lines)
  tell(vim.log.levels.ERROR, "[error] ", message, extra_lines)
end

local function warn(message, extra_lines)
  tell(vim.log.levels.WARN, "[warning] ", message, extra_lines)
end

-- The lines of the log that InstallFailed (the installer's) or McpServerFailed (the server's) carries.
local function log_lines(err)
  if type(err.data) == "table" and type(err.data.log) == "string" then
    return (cells.feed(nil, err.data.log))
  end
end

local function report_error(method, err)
  report(string.format("%s failed: %s", method, err.message), log_lines(err))
end

-- The daemon -------------------------------------------------------------------------------

local APPROVAL_CHOICES = "&Allow\nAllow in this &sandbox\n&Deny"
local allowed_tools = {} -- sandboxId, server and tool, NUL-joined -> true: allowed in that sandbox

-- The daemon asks before a cell calls a tool of an MCP server registered with `approval: "ask"`.
-- A handler answers a server's request with what it returns, so confirm() blocks the editor
-- until the user answers, as a permission prompt may; the cell waits meanwhile, the time not
-- counted against its timeout. Esc (0) denies.
local function approve_tool_call(_, params)
  local mode = config.approve_tool_calls
  if mode == "always" or mode == "never" then
    return { approved = mode == "always" }
  end
  local key = table.concat({ params.sandboxId, params.server, params.tool }, "\0")
  if allowed_tools[key] then
    return { approved = true }
  end
  local choice = vim.fn.confirm(cells.approval_message(params), APPROVAL_CHOICES, 3, "Warning")
  if choice == 2 then
    allowed_tools[key] = true
  end
  return { approved = choice == 1 or choice == 2 }
end

local handlers = {
  ["cellbox/approveToolCall"] = approve_tool_call,
  ["cellbox/output"] = function(_, params)
    enter(params.executionId)
    append_text(params.text)
  end,
  ["cellbox/display"] = function(_, params)
    enter(params.executionId)
    append_lines(cells.display_lines(params.data, params.path or params.file))
  end,
  ["cellbox/kernelStatus"] = function(_, params)
    state.kernel_state = params.state
  end,
}

local function forget_daemon()
  state.client_id, state.ready, state.on_ready = nil, false, {}
  state.sandbox, state.kernel_id, state.kernel_state, state.on_kernel = nil, nil, nil, nil
  state.labels, state.stopping = {}, false
end

-- Calls `fn(client)` once the daemon is initialized, starting it on first use.
local function with_client(fn)
  if state.ready then
    return fn(vim.lsp.get_client_by_id(state.client_id))
  end
  table.insert(state.on_ready, fn)
  if state.client_id then
    return
  end
  state.client_id = start_client({
    name = "cellbox",
    cmd = config.cmd,
    handlers = handlers,
    on_init = function(client, result)
      local experimental = result.capabilities.experimental or {}
      if not (experimental.cellbox and experimental.cellbox.protocolVersion == 1) then
        report(table.concat(config.cmd, " ") .. " does not speak cellbox protocol version 1")
        call(client, "stop")
        return
      end
      state.ready = true
      local waiting = state.on_ready
      state.on_ready = {}
      for _, waiter in ipairs(waiting) do
        waiter(client)
      end
    end,
    -- Called from libuv's loop, where the editor's API is off limits: hence the schedule.
    on_exit = function(code, signal)
      local stopped = state.stopping
      forget_daemon()
      vim.schedule(function()
        -- Neovim stops the daemon itself when it quits.
        if not stopped and vim.v.exiting == vim.NIL then
          report(string.format("the daemon exited (code %d, signal %d)", code, signal))
        end
      end)
    end,
  })
  if not state.client_id then
    forget_daemon()
    report("could not start " .. table.concat(config.cmd, " "))
  end
end

-- Sends a request once the daemon is up. An error goes to `on_error(method, err)`, by default
-- reported as a notification and in the output buffer.
local function request(method, params, on_result, on_error)
  with_client(function(client)
    call(client, "request", method, params, function(err, result)
      if err then
        (on_error or report_error)(method, err)
      elseif on_result then
        on_result(result)
      end
    end)
  end)
end

-- Registers the servers of the `mcp_servers` option in a new sandbox, then calls `done()`. A
-- malformed entry, or a server that fails to start or to be reached, is reported and left out:
-- the session goes on without it.
local function register_mcp_servers(sandbox_id, done)
  local servers, problems = cells.mcp_servers(config.mcp_servers)
  for _, problem in ipairs(problems) do
    warn(problem)
  end
  local pending = #servers
  if pending == 0 then
    return done()
  end
  local function answered()
    pending = pending - 1
    if pending == 0 then
      done()
    end
  end
  for _, server in ipairs(servers) do
    local params =
      { sandboxId = sandbox_id, name = server.name, server = server.server, approval = server.approval }
    request("cellbox/registerMcpServer", params, function(result)
      append_lines({ cells.registered_line(result) })
      answered()
    end, function(_, err)
      local log = log_lines(err)
      local message = string.format(
        "the MCP server %s was not registered: %s",
        vim.fn.json_encode(server.name),
        err.message
      )
      warn(message .. (log and " (its output is in cellbox://output)" or ""), log)
      answered()
    end)
  end
end

-- Calls `fn()` once the session's kernel runs, creating the sandbox (with the `mcp_servers`
-- registered in it) and starting it on first use.
local function with_kernel(fn)
  if state.kernel_id then
    return fn()
  end
  if state.on_kernel then
    table.insert(state.on_kernel, fn)
    return
  end
  state.on_kernel = { fn }
  local function give_up(method, err)
    state.on_kernel = nil
    report_error(method, err)
  end
  local function start_kernel()
    request("cellbox/startKernel", { sandboxId = state.sandbox.sandboxId }, function(kernel)
      state.kernel_id = kernel.kernelId
      local waiting = state.on_kernel
      state.on_kernel = nil
      for _, waiter in ipairs(waiting) do
        waiter()
      end
    end, give_up)
  end
  if state.sandbox then
    return start_kernel()
  end
  -- An empty Lua table is encoded as `[]`: params must be an object.
  local params = vim.empty_dict()
  params.backend, params.image = config.backend, config.image
  request("cellbox/createSandbox", params, function(sandbox)
    state.sandbox = sandbox
    register_mcp_servers(sandbox.sandboxId, start_kernel)
  end, give_up)
end

-- Attaches the daemon to a named Python buffer and binds the buffer to the kernel, so that its
-- completion (omnifunc) and hover come from the kernel's live state.
local function bind(bufnr)
  if
    not vim.api.nvim_buf_is_loaded(bufnr)
    or vim.bo[bufnr].filetype ~= "python"
    or vim.api.nvim_buf_get_name(bufnr) == ""
    or vim.lsp.buf_is_attached(bufnr, state.client_id)
  then
    return
  end
  vim.lsp.buf_attach_client(bufnr, state.client_id)
  vim.bo[bufnr].omnifunc = "v:lua.vim.lsp.omnifunc"
  local params = { uri = vim.uri_from_bufnr(bufnr), kernelId = state.kernel_id }
  request("cellbox/bindDocument", params, nil, function(method, err)
    if err.code ~= vim.lsp.protocol.ErrorCodes.MethodNotFound then
      return report_error(method, err)
    end
    if not state.no_editor_features then
      state.no_editor_features = true
      vim.notify(
        "cellbox: this daemon offers no completion or hover (no cellbox/bindDocument)",
        vim.log.levels.WARN
      )
    end
  end)
end

-- Commands ---------------------------------------------------------------------------------

local function label(bufnr, first, last)
  local name = vim.api.nvim_buf_get_name(bufnr)
  name = name == "" and string.format("[buffer %d]", bufnr) or vim.fn.fnamemodify(name, ":~:.")
  if not first then
    return name
  end
  return string.format("%s:%d-%d", name, first, last)
end

local function execute(bufnr, code, header)
  if not code:find("%S") then
    vim.notify("cellbox: nothing to run", vim.log.levels.INFO)
    return
  end
  show_output()
  with_kernel(function()
    bind(bufnr)
    state.next_execution = state.next_execution + 1
    local execution_id = "nvim-" .. state.next_execution
    state.labels[execution_id] = header
    local params =
      { kernelId = state.kernel_id, code = code, timeout = config.timeout, executionId = execution_id }
    local function finish()
      enter(execution_id)
      state.labels[execution_id] = nil
    end
    request("cellbox/execute", params, function(result)
      finish()
      append_lines(cells.result_lines(result))
      if result.status ~= "ok" then
        local err = result.error
        local why = err and string.format("%s: %s", err.ename, err.evalue) or result.status
        vim.notify(string.format("cellbox: %s: %s", header, why), vim.log.levels.ERROR)
      end
    end, function(method, err)
      finish()
      report_error(method, err)
    end)
  end)
end

--- Runs lines `range[1]` to `range[2]` (1-based) of the current buffer, or without a range the
--- `# %%` cell under the cursor.
function M.run(range)
  local bufnr = vim.api.nvim_get_current_buf()
  local first, last
  if range then
    first, last = range[1], range[2]
  else
    local lines = vim.api.nvim_buf_get_lines(bufnr, 0, -1, false)
    first, last = cells.cell_at(lines, vim.api.nvim_win_get_cursor(0)[1])
  end
  local code = table.concat(vim.api.nvim_buf_get_lines(bufnr, first - 1, last, false), "\n")
  execute(bufnr, code, label(bufnr, first, last))
end

function M.run_file()
  local bufnr = vim.api.nvim_get_current_buf()
  execute(bufnr, table.concat(vim.api.nvim_buf_get_lines(bufnr, 0, -1, false), "\n"), label(bufnr))
end

function M.install(packages)
  show_output()
  -- The header is written with the answer, so that it does not land inside a running cell's output.
  local header = "install " .. table.concat(packages, " ")
  with_kernel(function()
    local params = { sandboxId = state.sandbox.sandboxId, packages = packages }
    request("cellbox/installPackage", params, function(result)
      heading(header)
      local lines = {}
      for _, installed in ipairs(result.installed) do
        lines[#lines + 1] = string.format("[installed %s %s]", installed.name, installed.version)
      end
      append_lines(#lines > 0 and lines or { "[already installed]" })
    end, function(method, err)
      heading(header)
      report_error(method, err)
    end)
  end)
end

--- Opens the source of `modules`, as the sandbox would import them, in `cellbox://sources`.
function M.sources(modules)
  with_kernel(function()
    local params = { sandboxId = state.sandbox.sandboxId, modules = modules }
    request("cellbox/getSkillSources", params, function(result)
      sources_buf = scratch(sources_buf, "cellbox://sources")
      vim.bo[sources_buf].modifiable = true
      vim.api.nvim_buf_set_lines(sources_buf, 0, -1, false, (cells.feed(nil, result.formatted)))
      vim.bo[sources_buf].modifiable = false
      vim.bo[sources_buf].filetype = "markdown"
      local win = vim.fn.bufwinid(sources_buf)
      if win == -1 then
        vim.cmd("split")
        vim.api.nvim_win_set_buf(0, sources_buf)
      else
        vim.api.nvim_set_current_win(win)
      end
      vim.api.nvim_win_set_cursor(0, { 1, 0 })
    end)
  end)
end

local function kernel_request(method, on_result)
  if not state.kernel_id then
    vim.notify("cellbox: no kernel yet: run a cell first", vim.log.levels.INFO)
    return
  end
  request(method, { kernelId = state.kernel_id }, on_result)
end

function M.restart()
  kernel_request("cellbox/restartKernel", function()
    append_lines({ "[kernel restarted]" })
  end)
end

-- The interrupted cell's result (a KeyboardInterrupt) says the rest.
function M.interrupt()
  kernel_request("cellbox/interruptKernel")
end

--- Stops the daemon (shutdown, then exit); its kernels and sandboxes go with it.
function M.stop()
  local client = state.client_id and vim.lsp.get_client_by_id(state.client_id)
  if client then
    state.stopping = true
    call(client, "stop")
  end
end

return M

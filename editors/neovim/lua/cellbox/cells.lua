-- Pure helpers of the cellbox plugin (no editor state): cells in a buffer's lines, and what the
-- daemon sends turned into lines of the output buffer or into a prompt.
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

--- The question of a `cellbox/approveToolCall` request: the tool, its server and the arguments
--- (JSON, cut after `max_chars` characters). Names are JSON-quoted: a tool's name comes from
--- the server, and cannot break the prompt's lines so.
function M.approval_message(params, max_chars)
  max_chars = max_chars or MAX_ARGUMENT_CHARS
  local arguments = vim.fn.json_encode(params.arguments)
  local length = vim.fn.strchars(arguments)
  if length > max_chars then
    arguments = string.format(
      "%s… (%d more characters)",
      vim.fn.strcharpart(arguments, 0, max_chars),
      length - max_chars
    )
  end
  return string.format(
    "cellbox: allow a cell to call the tool %s of the MCP server %s?\nArguments: %s",
    vim.fn.json_encode(params.tool),
    vim.fn.json_encode(params.server),
    arguments
  )
end

return M

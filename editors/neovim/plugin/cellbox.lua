-- The :Cellbox* commands. They work without setup(); require("cellbox").setup{...} changes the defaults.
if vim.g.loaded_cellbox then
  return
end
vim.g.loaded_cellbox = true

local command = vim.api.nvim_create_user_command

command("CellboxRun", function(opts)
  require("cellbox").run(opts.range > 0 and { opts.line1, opts.line2 } or nil)
end, { range = true, desc = "cellbox: run the # %% cell under the cursor, or the lines of a range" })

command("CellboxRunFile", function()
  require("cellbox").run_file()
end, { desc = "cellbox: run the whole buffer" })

command("CellboxInstall", function(opts)
  require("cellbox").install(opts.fargs)
end, { nargs = "+", desc = "cellbox: install packages into the sandbox" })

command("CellboxSources", function(opts)
  require("cellbox").sources(opts.fargs)
end, { nargs = "+", desc = "cellbox: show the source of modules as the sandbox imports them" })

command("CellboxRestart", function()
  require("cellbox").restart()
end, { desc = "cellbox: restart the kernel" })

command("CellboxInterrupt", function()
  require("cellbox").interrupt()
end, { desc = "cellbox: interrupt the running cell" })

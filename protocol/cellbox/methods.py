"""Method names of the cellbox protocol, with the params and result type of each."""

from __future__ import annotations

from typing import Any, Final

from cellbox import types as t

CREATE_SANDBOX: Final = "cellbox/createSandbox"
LIST_SANDBOXES: Final = "cellbox/listSandboxes"
DESTROY_SANDBOX: Final = "cellbox/destroySandbox"
START_KERNEL: Final = "cellbox/startKernel"
SHUTDOWN_KERNEL: Final = "cellbox/shutdownKernel"
INTERRUPT_KERNEL: Final = "cellbox/interruptKernel"
RESTART_KERNEL: Final = "cellbox/restartKernel"
EXECUTE: Final = "cellbox/execute"
INSTALL_PACKAGE: Final = "cellbox/installPackage"
GET_SKILL_SOURCES: Final = "cellbox/getSkillSources"
BUILD_IMAGE: Final = "cellbox/buildImage"
LIST_IMAGES: Final = "cellbox/listImages"
BIND_DOCUMENT: Final = "cellbox/bindDocument"
WRITE_FILE: Final = "cellbox/writeFile"
READ_FILE: Final = "cellbox/readFile"
LIST_FILES: Final = "cellbox/listFiles"
DELETE_FILE: Final = "cellbox/deleteFile"
REGISTER_MCP_SERVER: Final = "cellbox/registerMcpServer"
UNREGISTER_MCP_SERVER: Final = "cellbox/unregisterMcpServer"

# the daemon's own request to its client
APPROVE_TOOL_CALL: Final = "cellbox/approveToolCall"

OUTPUT: Final = "cellbox/output"
DISPLAY: Final = "cellbox/display"
KERNEL_STATUS: Final = "cellbox/kernelStatus"

# method -> (params type, result type); a result type of None means the result is `null`.
REQUESTS: Final[dict[str, tuple[type[Any], type[Any] | None]]] = {
    CREATE_SANDBOX: (t.CreateSandboxParams, t.CreateSandboxResult),
    LIST_SANDBOXES: (t.ListSandboxesParams, t.ListSandboxesResult),
    DESTROY_SANDBOX: (t.DestroySandboxParams, None),
    START_KERNEL: (t.StartKernelParams, t.StartKernelResult),
    SHUTDOWN_KERNEL: (t.KernelParams, None),
    INTERRUPT_KERNEL: (t.KernelParams, None),
    RESTART_KERNEL: (t.KernelParams, None),
    EXECUTE: (t.ExecuteParams, t.ExecuteResult),
    INSTALL_PACKAGE: (t.InstallPackageParams, t.InstallPackageResult),
    GET_SKILL_SOURCES: (t.GetSkillSourcesParams, t.GetSkillSourcesResult),
    BUILD_IMAGE: (t.BuildImageParams, t.BuildImageResult),
    LIST_IMAGES: (t.ListImagesParams, t.ListImagesResult),
    BIND_DOCUMENT: (t.BindDocumentParams, None),
    WRITE_FILE: (t.WriteFileParams, t.WriteFileResult),
    READ_FILE: (t.ReadFileParams, t.ReadFileResult),
    LIST_FILES: (t.ListFilesParams, t.ListFilesResult),
    DELETE_FILE: (t.DeleteFileParams, None),
    REGISTER_MCP_SERVER: (t.RegisterMcpServerParams, t.RegisterMcpServerResult),
    UNREGISTER_MCP_SERVER: (t.UnregisterMcpServerParams, None),
}

# requests the daemon sends its client -> (params type, result type)
CLIENT_REQUESTS: Final[dict[str, tuple[type[Any], type[Any]]]] = {
    APPROVE_TOOL_CALL: (t.ApproveToolCallParams, t.ApproveToolCallResult),
}

# notification method -> params type
NOTIFICATIONS: Final[dict[str, type[Any]]] = {
    OUTPUT: t.OutputNotification,
    DISPLAY: t.DisplayNotification,
    KERNEL_STATUS: t.KernelStatusNotification,
}

<#
.SYNOPSIS
  go2cloud_client installer for Windows x86_64 (served by go2cloud_server at /download/install.ps1).

.DESCRIPTION
  The PowerShell one-liner printed by `go2cloud_server code create` downloads this script with the
  control plane's certificate pinned and runs it with -Server, -ServerFingerprint and -TokenId; the
  token code comes from $env:GO2CLOUD_TOKEN_CODE (never an argument).

  Steps: checks (Administrator, x86_64, fingerprint), download SHA256SUMS and
  go2cloud_client_windows_x86_64.zip into a temporary folder with the certificate pinned (SHA-256
  of the certificate must equal -ServerFingerprint), Get-FileHash check, Expand-Archive, stop a
  running agent, install in place into -Prefix (state\, identity\, Logs\, config.yaml and an
  existing Excludes list are kept), `go2cloud_client --home PREFIX --import-only ...`, then
  `go2cloud_client --home PREFIX service install` unless -NoService. Nothing is installed when a
  check, the download or the checksum fails.

  The agent is go2cloud_client.exe when the package holds one (packaging/windows/build.ps1),
  else go2cloud_client.pyz run by Python 3.9+ (py launcher or python.exe) with the dependencies
  installed.

  Exit status: 0 done, 2 usage, 3 this host cannot run it, 4 download failed or certificate
  mismatch, 5 checksum mismatch or bad package, 6 installing the files failed, 7 the agent's
  import or service step failed.
#>
param(
    [Parameter(Mandatory = $true)][string]$Server,
    [Parameter(Mandatory = $true)][string]$ServerFingerprint,
    [Parameter(Mandatory = $true)][string]$TokenId,
    [string]$Prefix = (Join-Path $env:ProgramFiles 'go2cloud_client'),
    [switch]$Yes,
    [switch]$NoPrompt,
    [switch]$NoService,
    # a local go2cloud_client_windows_x86_64.zip to install instead of downloading it
    [string]$Package = ''
)

Set-StrictMode -Version 2
$ErrorActionPreference = 'Stop'

# The control plane fills this in when it serves this script (GET /download/install.ps1).
$ServedFingerprint = ''

$PackageName = 'go2cloud_client_windows_x86_64'
$KeptNames = @('state', 'identity', 'Logs', 'config.yaml')

function Say([string]$Message) { Write-Host "go2cloud install: $Message" }
function Fail([int]$Code, [string]$Message) {
    # run as a file (powershell -File install.ps1): exit status; run by the one-liner (a script
    # block in the operator's session): a terminating error, so the window stays open
    if ($PSCommandPath) {
        [Console]::Error.WriteLine("go2cloud install: error: $Message")
        exit $Code
    }
    throw "go2cloud install: error: $Message"
}

# -- checks ---------------------------------------------------------------------------------------
if ($Server -notmatch '^https://') { Fail 2 "-Server must start with https:// (got: $Server)" }
$Server = $Server.TrimEnd('/')
$Fingerprint = $ServerFingerprint.ToLowerInvariant().Replace(':', '').Replace('sha256', 'sha256:')
if ($Fingerprint -notmatch '^sha256:[0-9a-f]{64}$') {
    Fail 2 '-ServerFingerprint must be sha256: followed by 64 hex digits'
}
$PinHex = $Fingerprint.Substring(7)
if ($ServedFingerprint -and $ServedFingerprint -ne $Fingerprint) {
    Fail 4 "pin mismatch: -ServerFingerprint $Fingerprint is not the certificate of the server this script came from ($ServedFingerprint)"
}
# the prefix becomes the agent home: a new or empty folder, or an earlier installation
if ((Test-Path -LiteralPath $Prefix) -and -not (Test-Path -Path (Join-Path $Prefix 'go2cloud_client.*')) -and
    -not (Test-Path -LiteralPath (Join-Path $Prefix 'state')) -and (Get-ChildItem -LiteralPath $Prefix -Force | Select-Object -First 1)) {
    Fail 2 "-Prefix $Prefix is not empty and holds no go2cloud_client installation; choose a new folder"
}
$principal = New-Object Security.Principal.WindowsPrincipal([Security.Principal.WindowsIdentity]::GetCurrent())
if (-not $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    Fail 3 'run PowerShell as Administrator'
}
$arch = if ($env:PROCESSOR_ARCHITEW6432) { $env:PROCESSOR_ARCHITEW6432 } else { $env:PROCESSOR_ARCHITECTURE }
if ($arch -ne 'AMD64') { Fail 3 "unsupported architecture ${arch}: the package is built for x86_64 only" }

# Every HTTPS request of this process accepts only the certificate whose SHA-256 is the pin.
[Net.ServicePointManager]::SecurityProtocol = [Net.SecurityProtocolType]::Tls12
[Net.ServicePointManager]::ServerCertificateValidationCallback = {
    param($s, $c)
    $hash = [Security.Cryptography.SHA256]::Create().ComputeHash($c.GetRawCertData())
    (-join ($hash | ForEach-Object { $_.ToString('x2') })) -eq $PinHex
}

function Get-Pinned([string]$Name, [string]$Destination) {
    $url = "$Server/download/$Name"
    try {
        (New-Object Net.WebClient).DownloadFile($url, $Destination)
    } catch [Net.WebException] {
        $status = $_.Exception.Status
        if ($status -eq [Net.WebExceptionStatus]::TrustFailure -or $status -eq [Net.WebExceptionStatus]::SecureChannelFailure) {
            Fail 4 "pin mismatch: the certificate of $Server is not $Fingerprint; nothing was installed"
        }
        Fail 4 "downloading $url failed ($($_.Exception.Message)); nothing was installed"
    }
}

$tmp = Join-Path ([IO.Path]::GetTempPath()) ('go2cloud_install_' + [guid]::NewGuid().ToString('N'))
New-Item -ItemType Directory -Path $tmp | Out-Null
try {
    # -- download and check ---------------------------------------------------------------------
    $zip = Join-Path $tmp "$PackageName.zip"
    if ($Package) {
        Copy-Item -LiteralPath $Package -Destination $zip
        Say "installing $Package (not downloaded)"
    } else {
        Say "downloading $PackageName.zip from $Server (certificate pinned)"
        $sums = Join-Path $tmp 'SHA256SUMS'
        Get-Pinned 'SHA256SUMS' $sums
        $expected = $null
        foreach ($line in Get-Content -LiteralPath $sums) {
            if ($line -match '^([0-9a-fA-F]{64}) [ *](.+)$' -and $Matches[2] -eq "$PackageName.zip") {
                $expected = $Matches[1].ToLowerInvariant()
            }
        }
        if (-not $expected) { Fail 5 "$Server does not publish $PackageName.zip (not listed in its SHA256SUMS)" }
        Get-Pinned "$PackageName.zip" $zip
        $actual = (Get-FileHash -Algorithm SHA256 -LiteralPath $zip).Hash.ToLowerInvariant()
        if ($actual -ne $expected) {
            Fail 5 "sha256 mismatch for ${PackageName}.zip: got $actual, SHA256SUMS says $expected; nothing was installed"
        }
        Say "sha256 $actual OK"
    }
    Add-Type -AssemblyName System.IO.Compression.FileSystem
    $archive = [IO.Compression.ZipFile]::OpenRead($zip)
    try {
        foreach ($entry in $archive.Entries) {
            if (-not $entry.FullName.StartsWith("$PackageName/") -or $entry.FullName -match '(^|[\\/])\.\.([\\/]|$)') {
                Fail 5 "$PackageName.zip has entries outside $PackageName/; refusing it"
            }
        }
    } finally { $archive.Dispose() }
    $extracted = Join-Path $tmp 'x'
    Expand-Archive -LiteralPath $zip -DestinationPath $extracted
    $new = Join-Path $extracted $PackageName

    # -- how to run the agent: the .exe, else the .pyz with Python 3.9+ ----------------------------
    if (Test-Path -LiteralPath (Join-Path $new 'go2cloud_client.exe')) {
        $agent = @(Join-Path $Prefix 'go2cloud_client.exe')
    } elseif (Test-Path -LiteralPath (Join-Path $new 'go2cloud_client.pyz')) {
        $python = $null
        foreach ($candidate in @(@('py', '-3'), @(, 'python'))) {
            if (Get-Command $candidate[0] -ErrorAction SilentlyContinue) { $python = $candidate; break }
        }
        if (-not $python) { Fail 3 'the package holds go2cloud_client.pyz, which needs Python 3.9 or newer: install it from python.org (or use a package with go2cloud_client.exe)' }
        $pyArgs = @($python | Select-Object -Skip 1)
        & $python[0] @pyArgs -c 'import sys; assert sys.version_info >= (3, 9); import click, requests, psutil, yaml, cryptography, tenacity, xxhash, zstandard, blake3' 2>$null
        if ($LASTEXITCODE -ne 0) {
            Fail 3 'Python 3.9+ with the agent dependencies is needed: py -m pip install click requests psutil pyyaml cryptography tenacity xxhash zstandard blake3'
        }
        $agent = @($python + @(Join-Path $Prefix 'go2cloud_client.pyz'))
    } else {
        Fail 5 "$PackageName.zip holds neither go2cloud_client.exe nor go2cloud_client.pyz"
    }
    $agentExe = $agent[0]
    $agentArgs = @($agent | Select-Object -Skip 1)

    # -- install in place -------------------------------------------------------------------------
    if (Test-Path -Path (Join-Path $Prefix 'go2cloud_client.*')) {
        Say "stopping the running agent of $Prefix (if any) before the upgrade"
        & $agentExe @agentArgs stop --home $Prefix
        if ($LASTEXITCODE -ne 0) { Say 'warning: stopping the agent failed; the files are replaced anyway' }
    }
    try {
        New-Item -ItemType Directory -Force -Path $Prefix | Out-Null
        foreach ($item in Get-ChildItem -LiteralPath $new) {
            if ($KeptNames -contains $item.Name) { continue }
            $dest = Join-Path $Prefix $item.Name
            if ($item.PSIsContainer) {
                New-Item -ItemType Directory -Force -Path $dest | Out-Null
                foreach ($file in Get-ChildItem -LiteralPath $item.FullName -File) {
                    $target = Join-Path $dest $file.Name
                    if ($item.Name -eq 'Excludes' -and (Test-Path -LiteralPath $target)) {
                        Copy-Item -LiteralPath $file.FullName -Destination "$target.default" -Force
                        Say "kept $target (your list; the shipped default is $target.default)"
                    } else {
                        Copy-Item -LiteralPath $file.FullName -Destination $target -Force
                    }
                }
            } else {
                Copy-Item -LiteralPath $item.FullName -Destination $dest -Force
            }
        }
    } catch {
        Fail 6 "installing the files into $Prefix failed: $($_.Exception.Message)"
    }
    Say "installed go2cloud_client $((Get-Content -LiteralPath (Join-Path $new 'VERSION') -ErrorAction SilentlyContinue)) in $Prefix"

    # -- import and service -------------------------------------------------------------------------
    $importArgs = @('--home', $Prefix, '--import-only', '--server', $Server, '--server-fingerprint', $Fingerprint, '--token-id', $TokenId)
    if ($Yes) { $importArgs += '--yes' }
    if ($NoPrompt) { $importArgs += '--no-prompt' }
    & $agentExe @agentArgs @importArgs
    $rc = $LASTEXITCODE
    Remove-Item Env:GO2CLOUD_TOKEN_CODE -ErrorAction SilentlyContinue
    if ($rc -ne 0) { Fail 7 "the import failed (go2cloud_client exit $rc; log: $Prefix\Logs\go2cloud_client.log); fix the cause and run the one-liner again" }
    if (-not $NoService) {
        & $agentExe @agentArgs --home $Prefix service install
        if ($LASTEXITCODE -ne 0) { Fail 7 "installing the service failed (go2cloud_client exit $LASTEXITCODE)" }
        Say 'done: the agent runs as the go2cloud_client service'
    } else {
        Say "done (no service): start the agent with: $($agent -join ' ') --home `"$Prefix`""
    }
} finally {
    Remove-Item -LiteralPath $tmp -Recurse -Force -ErrorAction SilentlyContinue
    Remove-Item Env:GO2CLOUD_TOKEN_CODE -ErrorAction SilentlyContinue
    [Net.ServicePointManager]::ServerCertificateValidationCallback = $null
}

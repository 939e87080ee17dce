<#
.SYNOPSIS
  Build go2cloud_client.exe (PyInstaller one-file) and the Windows package on a Windows machine.

.DESCRIPTION
  Run from a checkout of the repository, in PowerShell, with 64-bit Python 3.9+ on PATH (py launcher):

    powershell -ExecutionPolicy Bypass -File packaging\windows\build.ps1 [-Out dist]

  It installs the agent with its build dependencies into a virtual environment under
  build\win-venv, runs PyInstaller on packaging\go2cloud_client.spec (the same spec as the Linux
  build), and writes dist\go2cloud_client_windows_x86_64.zip with go2cloud_client.exe added next to
  the .pyz, plus dist\SHA256SUMS.windows (publish it by merging it into SHA256SUMS).
  NOT RUN in the project's CI (Linux only): see packaging/README.md.
#>
param([string]$Out = 'dist')

Set-StrictMode -Version 2
$ErrorActionPreference = 'Stop'
$root = Resolve-Path (Join-Path $PSScriptRoot '..\..')
Set-Location $root
$name = 'go2cloud_client_windows_x86_64'

$venv = Join-Path $root 'build\win-venv'
if (-not (Test-Path (Join-Path $venv 'Scripts\python.exe'))) { py -3 -m venv $venv }
$python = Join-Path $venv 'Scripts\python.exe'
& $python -m pip install --upgrade pip
& $python -m pip install -e '.[test]'
if ($LASTEXITCODE -ne 0) { throw 'pip install failed' }

# the .pyz package (and the shared files) come from the platform-independent part of build.py
& $python -c "import sys; sys.path.insert(0, 'packaging'); import build, pathlib; out = pathlib.Path(sys.argv[1]).absolute(); out.mkdir(exist_ok=True); m = int(__import__('time').time()); build.write_zip(out / (build.WINDOWS_NAME + '.zip'), build.WINDOWS_NAME, build.windows_entries(m), m)" $Out
if ($LASTEXITCODE -ne 0) { throw 'writing the Windows package failed' }

& $python -m PyInstaller --noconfirm --distpath build\win-pyinstaller\dist --workpath build\win-pyinstaller\work packaging\go2cloud_client.spec
if ($LASTEXITCODE -ne 0) { throw 'PyInstaller failed' }
$exe = 'build\win-pyinstaller\dist\go2cloud_client.exe'
& $exe --version
if ($LASTEXITCODE -ne 0) { throw "$exe --version failed" }

# add go2cloud_client.exe to the zip, next to the .pyz
Add-Type -AssemblyName System.IO.Compression, System.IO.Compression.FileSystem
$zipPath = Join-Path (Resolve-Path $Out) "$name.zip"
$zip = [IO.Compression.ZipFile]::Open($zipPath, 'Update')
try {
    [IO.Compression.ZipFileExtensions]::CreateEntryFromFile($zip, (Resolve-Path $exe), "$name/go2cloud_client.exe") | Out-Null
} finally { $zip.Dispose() }
$hash = (Get-FileHash -Algorithm SHA256 -LiteralPath $zipPath).Hash.ToLowerInvariant()
Set-Content -LiteralPath (Join-Path $Out 'SHA256SUMS.windows') -Value "$hash  $name.zip" -Encoding ascii
Write-Host "built $zipPath ($hash)"

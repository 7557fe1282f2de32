// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "DAX",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "DAX", targets: ["DAX"]),
        // The plumbing of the programs here (errors as one line on stderr, exit 64 for bad
        // arguments, crash-exploration options), for a command-line program of one's own.
        .library(name: "CommandLineSupport", targets: ["CommandLineSupport"]),
        .executable(name: "daxemu", targets: ["daxemu"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        // `swift package generate-documentation --target DAX` (scripts/docs); a plugin only, so it
        // is never built into the library or the tools.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        // The C boundary: libpmem and the few Linux calls Glibc does not export.
        .systemLibrary(
            name: "CLibPMem",
            pkgConfig: "libpmem",
            providers: [.apt(["libpmem-dev"])]
        ),
        .target(
            name: "DAX",
            dependencies: ["CLibPMem"]
        ),
        // How every program here reports errors: one line on stderr and an exit status.
        .target(
            name: "CommandLineSupport",
            dependencies: ["DAX", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .executableTarget(
            name: "daxemu",
            dependencies: [
                "DAX", "CommandLineSupport",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),

        // Example apps: each an executable target with a README.
        .executableTarget(
            name: "kvstore",
            dependencies: [
                "DAX", "CommandLineSupport", .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "examples/kvstore",
            exclude: ["README.md"]
        ),
        .executableTarget(
            name: "pmemlog",
            dependencies: [
                "DAX", "CommandLineSupport", .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "examples/pmemlog",
            exclude: ["README.md"]
        ),
        .executableTarget(
            name: "simple-copy",
            dependencies: [
                "DAX", "CommandLineSupport", .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "examples/simple-copy",
            exclude: ["README.md"]
        ),
        .executableTarget(
            name: "rdma-buffer",
            dependencies: [
                "DAX", "CommandLineSupport", .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "examples/rdma-buffer",
            exclude: ["README.md"]
        ),

        // Benchmarks: an executable target so that peers written in C run in the same process.
        .target(
            name: "CBenchPeers",
            dependencies: ["CLibPMem"],
            path: "Benchmarks/CBenchPeers",
            linkerSettings: [.linkedLibrary("lmdb")]
        ),
        .executableTarget(
            name: "daxbench",
            dependencies: ["DAX", "CBenchPeers"],
            path: "Benchmarks/daxbench"
        ),

        // Crash tests: a workload model shared by the tests and a worker process they SIGKILL.
        .target(
            name: "DAXTorture",
            dependencies: ["DAX"],
            path: "Tests/Torture"
        ),
        .executableTarget(
            name: "daxcrashworker",
            dependencies: ["DAX", "DAXTorture"],
            path: "Tests/CrashWorker"
        ),
        .testTarget(
            name: "DAXTests",
            dependencies: [
                "DAX", "DAXTorture", "CommandLineSupport", "daxcrashworker", "daxemu", "kvstore", "pmemlog",
                "simple-copy", "rdma-buffer",
            ]
        ),
    ]
)

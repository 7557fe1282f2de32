// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "DAX",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "DAX", targets: ["DAX"]),
        .executable(name: "daxemu", targets: ["daxemu"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0")
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
        .executableTarget(
            name: "daxemu",
            dependencies: [
                "DAX",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),

        // Benchmarks: an executable target so that peers written in C run in the same process.
        .target(
            name: "CBenchPeers",
            dependencies: ["CLibPMem"],
            path: "Benchmarks/CBenchPeers"
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
            dependencies: ["DAX", "DAXTorture", "daxcrashworker"]
        ),
    ]
)
